"""JAX/Flax backend: the book's BERT (Flax `linen` + `optax`), its checkpoint format, and its fine-tuning loop.

The names are the book's (`d2l.BERTModel`, `d2l.train_ch13`, ...), so chapter code reads
`from nlibert.backends.jax import BERTModel, load_pretrained_model, train_ch13`. The model
classes are linen modules bound to their parameters (`.module`, `.params`): calling one applies
it in evaluation mode, as the other backends' modules are called.
"""
from .model import (masked_softmax, BERTEncoder, MaskLM, NextSentencePred, BERTModel, BERTClassifier,
                    set_fused_attention)
from .checkpoint import (read_params, write_params, load_pretrained_model, save_pretrained,
                         save_classifier, load_classifier)
from .train import (try_all_gpus, split_batch_multi_inputs, evaluate_accuracy, train_batch_ch13,
                    FinetuneStep, train_ch13, train_fast, predict_proba)
from .pretrain import (initialize_bert, PretrainStep, train_bert, save_training_state,
                       load_training_state)
from .runtime import (parse_devices, init_distributed, launch_processes, set_seed, make_loss, make_trainer, framework_versions,
                      initialize_classifier_head, bert_outputs, classifier_logits)

from ..contract import __all__  # noqa: F401  (the contract's names, in its order)
