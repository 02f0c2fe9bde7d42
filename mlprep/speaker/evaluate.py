"""Speaker evaluation metrics: held-out identification accuracy, verification EER and minDCF.

Held-out utterances are chosen per speaker by a seeded hash of their ids (the same whatever the shard
count), scored by cosine against every speaker's centroid of the remaining utterances: the top-1 centroid
is the identification answer, and every (utterance, speaker) score is one verification trial, a target
trial when the speaker is the utterance's own.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlprep.ids import stable_hash
from mlprep.speaker.speakers import _group_mean


def choose_holdout(speaker_keys: pd.Series, item_ids: pd.Series, per_speaker: int, seed: int) -> np.ndarray:
    """Boolean mask: `per_speaker` utterances of each speaker that keeps at least one other, chosen by
    a hash of (seed, item id)."""
    keys = speaker_keys.to_numpy()
    ranks = pd.Series([stable_hash(f"{seed}/{item}") for item in item_ids], dtype="uint64")
    frame = pd.DataFrame({"key": keys, "rank": ranks.to_numpy()})
    order = frame.groupby("key")["rank"].rank(method="first").to_numpy()
    sizes = frame.groupby("key")["key"].transform("size").to_numpy()
    return (order <= per_speaker) & (sizes > per_speaker)


def verification_metrics(scores: np.ndarray, is_target: np.ndarray, p_target: float = 0.01) -> dict:
    """EER (where the miss and false-alarm rates cross, interpolated) and the normalised minimum detection
    cost at `p_target` (C_miss = C_fa = 1) over all thresholds."""
    scores, is_target = np.asarray(scores, dtype=np.float64), np.asarray(is_target, dtype=bool)
    n_target, n_nontarget = int(is_target.sum()), int((~is_target).sum())
    if not n_target or not n_nontarget:
        return {"eer": None, "min_dcf": None, "threshold_at_eer": None, "trials": int(len(scores))}
    order = np.argsort(scores, kind="stable")
    sorted_target = is_target[order]
    # threshold just above the k lowest scores: those k are rejected
    p_miss = np.r_[0, np.cumsum(sorted_target)] / n_target
    p_fa = 1 - np.r_[0, np.cumsum(~sorted_target)] / n_nontarget
    diff = p_miss - p_fa
    k = int(np.argmax(diff >= 0))  # first point where misses reach false alarms
    if k == 0:
        eer = float(p_fa[0])
    else:
        span = diff[k] - diff[k - 1]
        w = 0.0 if span == 0 else -diff[k - 1] / span
        eer = float(p_miss[k - 1] + w * (p_miss[k] - p_miss[k - 1]))
    dcf = p_target * p_miss + (1 - p_target) * p_fa
    min_dcf = float(dcf.min() / min(p_target, 1 - p_target))
    sorted_scores = scores[order]
    threshold = float(sorted_scores[min(k, len(sorted_scores) - 1)])
    return {"eer": eer, "min_dcf": min(min_dcf, 1.0), "threshold_at_eer": threshold, "trials": int(len(scores)),
            "target_trials": n_target, "nontarget_trials": n_nontarget}


def evaluate(speaker_keys: pd.Series, item_ids: pd.Series, vectors: np.ndarray, per_speaker: int = 1,
             seed: int = 0, p_target: float = 0.01) -> dict:
    """Identification top-1 and verification metrics of held-out utterances against centroids of the rest."""
    held = choose_holdout(speaker_keys, item_ids, per_speaker, seed)
    keys = speaker_keys.to_numpy()
    unit = (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    enrol_keys, inverse = np.unique(keys[~held], return_inverse=True)
    centroids = _group_mean(unit[~held], inverse, np.bincount(inverse, minlength=len(enrol_keys)))
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    if not held.any() or len(enrol_keys) < 2:
        return {"speakers": int(len(enrol_keys)), "held_out": int(held.sum()), "top1": None, "eer": None,
                "min_dcf": None, "note": "needs at least 2 speakers with a held-out utterance"}
    scores = unit[held] @ centroids.T
    truth = np.searchsorted(enrol_keys, keys[held])
    top1 = float((scores.argmax(axis=1) == truth).mean())
    is_target = np.zeros_like(scores, dtype=bool)
    is_target[np.arange(len(truth)), truth] = True
    metrics = verification_metrics(scores.ravel(), is_target.ravel(), p_target)
    return {"speakers": int(len(enrol_keys)), "held_out": int(held.sum()), "top1": top1, "p_target": p_target,
            **metrics}
