"""MXNet Gluon backend: the book's BERT, its checkpoint format, and its fine-tuning loop.

The names are the book's (`d2l.BERTModel`, `d2l.train_ch13`, ...), so chapter code reads
`from nlibert.backends.mxnet import BERTModel, load_pretrained_model, train_ch13`.
Importing it switches MXNet to its numpy interface (`npx.set_np()`), as the book's MXNet code does.
"""
import os

# MXNet 1.9's engine (src/engine/openmp.cc), unless OMP_NUM_THREADS or MXNET_OMP_MAX_THREADS is
# set, halves omp_get_num_procs() on Intel CPUs (assuming hyper-threading) and calls
# omp_set_num_threads with that at import. libgomp is shared by the process, so on a 2-core machine
# MXNet *and* torch then run on one thread. Naming every core we may use keeps both at full width;
# a user's own OMP_NUM_THREADS / MXNET_OMP_MAX_THREADS is left alone.
if "OMP_NUM_THREADS" not in os.environ and "MXNET_OMP_MAX_THREADS" not in os.environ:
    os.environ["MXNET_OMP_MAX_THREADS"] = str(len(os.sched_getaffinity(0)))

from mxnet import npx  # noqa: E402

npx.set_np()

from .model import (BERTEncoder, MaskLM, NextSentencePred, BERTModel, BERTClassifier,  # noqa: E402
                    set_fused_attention)
from .checkpoint import (read_params, write_params, load_pretrained_model, save_pretrained,  # noqa: E402
                         save_classifier, load_classifier)
from .train import (try_all_gpus, split_batch_multi_inputs, evaluate_accuracy, train_batch_ch13,  # noqa: E402
                    FinetuneStep, train_ch13, train_fast, predict_proba)
from .pretrain import (initialize_bert, PretrainStep, train_bert, save_training_state,  # noqa: E402
                       load_training_state)
from .runtime import (parse_devices, set_seed, make_loss, make_trainer, framework_versions,  # noqa: E402
                      initialize_classifier_head, bert_outputs, classifier_logits)

from ..contract import __all__  # noqa: E402,F401  (the contract's names, in its order)
