"""Framework-neutral core (numpy only): data hub, SNLI, vocabulary (word-level and WordPiece),
packing, batching, checkpoint names (the book's and Hugging Face's).

The book's names import from here directly, so notebook code ports by changing one import:
`from nlibert.core import read_snli, tokenize, Vocab, get_tokens_and_segments, SNLIBERTDataset`.
"""
from .batching import BatchIterator, batch_indices
from .config import BERTConfig
from .hf import load_hf_checkpoint, read_hf_config
from .data_hub import DATA_HUB, DATA_URL, download, download_extract
from .packing import SNLIBERTDataset, get_tokens_and_segments, pack_pairs, truncate_pair_of_tokens
from .snli import read_snli, read_snli_file, split_dataset
from .vocab import Vocab, load_vocab, save_vocab, tokenize
from .wiki import WikiTextDataset, load_data_wiki, read_wiki
from .wordpiece import WordPieceVocab, load_wordpiece_vocab

__all__ = [
    "BatchIterator", "batch_indices", "BERTConfig", "DATA_HUB", "DATA_URL", "download", "download_extract",
    "SNLIBERTDataset", "get_tokens_and_segments", "pack_pairs", "truncate_pair_of_tokens",
    "read_snli", "read_snli_file", "split_dataset", "Vocab", "load_vocab", "save_vocab", "tokenize",
    "WikiTextDataset", "load_data_wiki", "read_wiki", "WordPieceVocab", "load_wordpiece_vocab",
    "load_hf_checkpoint", "read_hf_config",
]
