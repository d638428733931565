"""MXNet Gluon backend: the book's BERT, its checkpoint format, and its fine-tuning loop.

The names are the book's (`d2l.BERTModel`, `d2l.train_ch13`, ...), so chapter code reads
`from nlibert.backends.mxnet import BERTModel, load_pretrained_model, train_ch13`.
Importing it switches MXNet to its numpy interface (`npx.set_np()`), as the book's MXNet code does.
"""
from mxnet import npx

npx.set_np()

from .model import BERTEncoder, MaskLM, NextSentencePred, BERTModel, BERTClassifier  # noqa: E402
from .checkpoint import (load_pretrained_model, save_pretrained, save_classifier, load_classifier,  # noqa: E402
                         read_params, write_params)
from .train import (train_ch13, evaluate_accuracy, try_all_gpus, predict_proba,  # noqa: E402
                    split_batch_multi_inputs)
from .runtime import (parse_devices, set_seed, make_loss, make_trainer, framework_versions,  # noqa: E402
                      initialize_classifier_head, bert_outputs, classifier_logits)

__all__ = [
    "BERTEncoder", "MaskLM", "NextSentencePred", "BERTModel", "BERTClassifier",
    "load_pretrained_model", "save_pretrained", "save_classifier", "load_classifier",
    "read_params", "write_params",
    "train_ch13", "evaluate_accuracy", "try_all_gpus", "predict_proba", "split_batch_multi_inputs",
    "parse_devices", "set_seed", "make_loss", "make_trainer", "framework_versions",
    "initialize_classifier_head", "bert_outputs", "classifier_logits",
]

from .pretrain import initialize_bert, train_bert, save_training_state, load_training_state  # noqa: E402

__all__ += ["initialize_bert", "train_bert", "save_training_state", "load_training_state"]

from .model import set_fused_attention  # noqa: E402
from .train import train_fast  # noqa: E402

__all__ += ["set_fused_attention", "train_fast"]
