"""`rere data`: datasets into D3-format splits, one file per idea:

- `stage.py`: the command (fetch, preprocess, write the folder atomically).
- `corpus.py`: `Corpus`, what every source reader returns.
- `movielens.py`: MovieLens-100K from the RecBole wheel or GroupLens's zip.
- `amazon.py`: Amazon Review Data 2018 with the D3/ReRe preprocessing.
- `d3.py`: import of an existing D3 folder.
- `splits.py`: unique titles, seeded ids, samples, `leave_one_out` and `temporal` splits.
"""

from rere.data.amazon import clean_amazon_title, k_core, read_amazon
from rere.data.corpus import Corpus
from rere.data.d3 import import_d3
from rere.data.movielens import RECBOLE_INTER, RECBOLE_ITEM, read_grouplens, read_recbole
from rere.data.splits import (
    assign_ids,
    build_from_corpus,
    make_samples,
    same_time_order,
    same_time_share,
    split_leave_one_out,
    split_temporal,
    unique_titles,
    user_sequences,
)
from rere.data.stage import add_arguments, build, run, write_dataset

__all__ = [
    "RECBOLE_INTER",
    "RECBOLE_ITEM",
    "Corpus",
    "add_arguments",
    "assign_ids",
    "build",
    "build_from_corpus",
    "clean_amazon_title",
    "import_d3",
    "k_core",
    "make_samples",
    "read_amazon",
    "read_grouplens",
    "read_recbole",
    "same_time_order",
    "same_time_share",
    "run",
    "split_leave_one_out",
    "split_temporal",
    "unique_titles",
    "user_sequences",
    "write_dataset",
]
