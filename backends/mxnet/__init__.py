"""MXNet Gluon backend: the book's BERT, its checkpoint format, and its fine-tuning loop.

The names are the book's (`d2l.BERTModel`, `d2l.train_ch13`, ...), so chapter code reads
`from nlibert.backends.mxnet import BERTModel, load_pretrained_model, train_ch13`.
Importing it switches MXNet to its numpy interface (`npx.set_np()`), as the book's MXNet code does.
"""
import warnings

import nlibert

if nlibert._mxnet_started_before_nlibert:
    # MXNet fixed its thread count when it started (see nlibert/__init__.py): too late to change.
    warnings.warn("mxnet was imported before nlibert, so MXNet (and torch beside it) may use only half the "
                  "cores: import nlibert first, or set MXNET_OMP_MAX_THREADS to the number of cores before "
                  "importing mxnet", RuntimeWarning, stacklevel=2)

from mxnet import npx  # noqa: E402

npx.set_np()

from .model import (masked_softmax, BERTEncoder, MaskLM, NextSentencePred, BERTModel, BERTClassifier,  # noqa: E402
                    set_fused_attention)
from .checkpoint import (read_params, write_params, load_pretrained_model, save_pretrained,  # noqa: E402
                         save_classifier, load_classifier)
from .train import (try_all_gpus, split_batch_multi_inputs, evaluate_accuracy, train_batch_ch13,  # noqa: E402
                    FinetuneStep, train_ch13, train_fast, predict_proba)
from .pretrain import (initialize_bert, PretrainStep, train_bert, save_training_state,  # noqa: E402
                       load_training_state)
from .runtime import (parse_devices, init_distributed, launch_processes, set_seed, make_loss, make_trainer, framework_versions,  # noqa: E402
                      initialize_classifier_head, bert_outputs, classifier_logits)

from ..contract import __all__  # noqa: E402,F401  (the contract's names, in its order)
