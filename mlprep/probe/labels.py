"""The classifier probe's labels against its model's classes: each label's class indices, by name or by
`probe.classes`, and a clear message with the classes a label may mean when it names none. Light on purpose (no
torch, no timm import): the check runs while Snakemake builds the DAG, before any job starts."""

from __future__ import annotations

import json
from pathlib import Path

from mlprep.failures import InputError


def label_classes(labels: list[str], class_names: list[str], mapping: dict | None = None) -> list[list[int]]:
    """The classifier's classes of each label: `mapping[label]` (class indices) where given, else the one class
    one of whose comma-separated names is the label (case aside). ValueError names every label that maps to no
    class or to several, with the classes it might mean, and says how to write `probe.classes`."""
    mapping = mapping or {}
    by_name: dict[str, list[int]] = {}
    for k, name in enumerate(class_names):
        for synonym in name.split(","):
            by_name.setdefault(synonym.strip().lower(), []).append(k)
    out, problems, example = [], [], {}
    for label in labels:
        if label in mapping:
            classes = [int(c) for c in mapping[label]]
            bad = [c for c in classes if not 0 <= c < len(class_names)]
            if bad or not classes:
                problems.append(f"{label!r} maps to {bad or 'no class'} (the model has {len(class_names)} classes)")
        else:
            classes = by_name.get(label.strip().lower(), [])
            if len(classes) > 1:
                found = "; ".join(f"{c} {class_names[c]!r}" for c in classes)
                problems.append(f"{label!r} names several classes; they are: {found}")
                example[label] = classes
            elif not classes:
                named, spelled = similar_classes(label, class_names)
                hints = [f"classes named with it: {'; '.join(f'{c} {class_names[c]!r}' for c in named)}"] if named \
                    else []
                hints += [f"spelled alike: {'; '.join(f'{c} {class_names[c]!r}' for c in spelled)}"] if spelled else []
                problems.append(f"{label!r} names no class ({', '.join(hints) or 'none named or spelled like it'})")
                if named:
                    example[label] = named
        out.append(classes)
    if problems:
        how = ", ".join(f"{json.dumps(label)}: {sorted(c)}" for label, c in list(example.items())[:3]) or \
            '"<label>": [<class index>, ...]'
        raise LabelMappingError(
            f"probe_qa.probe.classes: {len(problems)} label(s) of the data are not one of the classifier's "
            f"{len(class_names)} classes by name: " + " | ".join(problems) + ". Give each its class indices (a "
            f"label may take several; its score is their summed probability) in the config, e.g. probe: classes: "
            f"{{{how}}}; or use probe.backend clip_zero_shot, which takes any label.")
    return out


class LabelMappingError(InputError):
    """The data's labels cannot be mapped onto the classifier's classes; the message says how to fix it."""


def similar_classes(label: str, class_names: list[str], limit: int = 8) -> tuple[list[int], list[int]]:
    """(classes with a name holding the label as a word: 'cat' -> 'tiger cat', 'Persian cat'; where there are
    none, classes with a name spelled close to it) for a label that names no class."""
    import difflib
    import re

    word = re.compile(rf"\b{re.escape(label.strip().lower())}s?\b")
    named = [k for k, name in enumerate(class_names) if any(word.search(s.strip().lower()) for s in name.split(","))]
    synonyms = {s.strip().lower(): k for k, name in enumerate(class_names) for s in name.split(",")}
    close = difflib.get_close_matches(label.strip().lower(), list(synonyms), n=limit, cutoff=0.75)
    spelled = [] if named else list(dict.fromkeys(synonyms[s] for s in close))
    return named[:limit], spelled[: max(0, limit - len(named))]


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's class names as timm lists them (index -> 'name, synonym, ...'), read from the lists timm
    ships without importing it (or torch): the check runs while the DAG is built."""
    from importlib.util import find_spec

    spec = find_spec("timm")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("timm is not installed: it holds ImageNet's class names")
    folder = Path(spec.origin).parent / "data" / "_info"
    synsets = (folder / "imagenet_synsets.txt").read_text().split()
    lemmas = dict(line.split("\t", 1) for line in (folder / "imagenet_synset_to_lemma.txt").read_text().splitlines()
                  if "\t" in line)
    return [lemmas[s].strip() for s in synsets]


def check_label_mapping(cfg: dict, labels: list[str]) -> None:
    """Before any job: the classifier probe's labels against its classes, where the classes are known without
    loading the model (packaged ImageNet weights); LabelMappingError says what to write in `probe.classes`."""
    from mlprep.weights import is_packaged

    probe = cfg.get("probe") or {}
    if probe.get("backend") != "classifier" or not labels:
        return
    if is_packaged(str((probe.get("model") or {}).get("pretrained") or "")):
        label_classes(labels, imagenet_class_names(), probe.get("classes"))
