"""The local test tasks' data: JSONL files beside this module, as the `datasets` the task YAMLs load
(custom_dataset: !function local_data.<name>), so that no download and no working directory is involved."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str) -> datasets.DatasetDict:
    with open(os.path.join(HERE, name), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**_) -> datasets.DatasetDict:
    return _load("multiple_choice.jsonl")


def generation(**_) -> datasets.DatasetDict:
    return _load("generation.jsonl")
