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
from mlprep.speaker.speakers import group_mean


def choose_holdout(speaker_keys: pd.Series, item_ids: pd.Series, per_speaker: int, seed: int) -> np.ndarray:
    """Boolean mask: `per_speaker` utterances of each speaker that keeps at least one other, chosen by
    a hash of (seed, item id)."""
    keys = speaker_keys.to_numpy()
    ranks = pd.Series([stable_hash(f"{seed}/{item}") for item in item_ids], dtype="uint64")
    frame = pd.DataFrame({"key": keys, "rank": ranks.to_numpy()})
    order = frame.groupby("key")["rank"].rank(method="first").to_numpy()
    sizes = frame.groupby("key")["key"].transform("size").to_numpy()
    return (order <= per_speaker) & (sizes > per_speaker)


def verification_metrics(scores: np.ndarray, is_target: np.ndarray, p_target: float = 0.01,
                         threshold: float | None = None) -> dict:
    """EER (where the miss and false-alarm rates cross, interpolated), the normalised minimum detection cost at
    `p_target` (C_miss = C_fa = 1) over all thresholds, and the operating threshold with its error rates.

    The operating threshold (`threshold`) is `threshold` when given (rule `config`); else, where every target
    score lies above every non-target score, the middle of the gap between them (rule `gap_middle`: a new
    recording a little below the lowest target score seen is still accepted); else the EER point, interpolated
    between the scores on either side of the crossing (rule `eer`). `threshold_at_eer` is always the latter."""
    scores, is_target = np.asarray(scores, dtype=np.float64), np.asarray(is_target, dtype=bool)
    n_target, n_nontarget = int(is_target.sum()), int((~is_target).sum())
    if not n_target or not n_nontarget:
        return {"eer": None, "min_dcf": None, "threshold_at_eer": None, "threshold": threshold,
                "threshold_rule": "config" if threshold is not None else None, "trials": int(len(scores)),
                "target_trials": n_target, "nontarget_trials": n_nontarget}
    order = np.argsort(scores, kind="stable")
    sorted_target, sorted_scores = is_target[order], scores[order]
    # point j rejects the j lowest scores: its threshold lies between sorted_scores[j - 1] and sorted_scores[j]
    p_miss = np.r_[0, np.cumsum(sorted_target)] / n_target
    p_fa = 1 - np.r_[0, np.cumsum(~sorted_target)] / n_nontarget
    cuts = np.r_[sorted_scores[0], (sorted_scores[:-1] + sorted_scores[1:]) / 2, sorted_scores[-1] + 1e-9]
    diff = p_miss - p_fa
    k = int(np.argmax(diff >= 0))  # first point where misses reach false alarms
    if k == 0:
        eer, eer_threshold = float(p_fa[0]), float(cuts[0])
    else:
        span = diff[k] - diff[k - 1]
        w = 0.0 if span == 0 else -diff[k - 1] / span
        eer = float(p_miss[k - 1] + w * (p_miss[k] - p_miss[k - 1]))
        eer_threshold = float(cuts[k - 1] + w * (cuts[k] - cuts[k - 1]))
    dcf = p_target * p_miss + (1 - p_target) * p_fa
    min_dcf = float(dcf.min() / min(p_target, 1 - p_target))
    lowest_target, highest_nontarget = float(scores[is_target].min()), float(scores[~is_target].max())
    separable = lowest_target > highest_nontarget
    if threshold is not None:
        rule, chosen = "config", float(threshold)
    elif separable:
        rule, chosen = "gap_middle", (lowest_target + highest_nontarget) / 2
    else:
        rule, chosen = "eer", eer_threshold
    return {"eer": eer, "min_dcf": min(min_dcf, 1.0), "threshold_at_eer": eer_threshold,
            "threshold": chosen, "threshold_rule": rule, "separable": separable,
            "lowest_target_score": lowest_target, "highest_nontarget_score": highest_nontarget,
            # how far the threshold sits from the nearest score of each kind (negative: that score is misjudged)
            "margin_to_targets": lowest_target - chosen, "margin_to_nontargets": chosen - highest_nontarget,
            "miss_rate": float((scores[is_target] < chosen).mean()),
            "false_alarm_rate": float((scores[~is_target] >= chosen).mean()),
            "trials": int(len(scores)), "target_trials": n_target, "nontarget_trials": n_nontarget}


def describe_threshold(result: dict) -> str:
    """One sentence: what the operating threshold is, how it was chosen and how much evidence it rests on."""
    if result.get("threshold") is None:
        return "no threshold: the evaluation had no target or no non-target trial; scores only"
    thr = result["threshold"]
    rule = {"gap_middle": "the middle of the gap between the held-out scores",
            "eer": "the equal-error point of the held-out scores (they overlap)",
            "config": "set in the config (speaker_embed.eval.threshold)"}.get(result.get("threshold_rule"), "?")
    text = f"{thr:.4f}: {rule}"
    if result.get("lowest_target_score") is not None:
        text += (f"; lowest own-speaker score {result['lowest_target_score']:.4f} (margin "
                 f"{result['margin_to_targets']:+.4f}), highest other-speaker score "
                 f"{result['highest_nontarget_score']:.4f} (margin {result['margin_to_nontargets']:+.4f}); "
                 f"{result['target_trials']} own-speaker and {result['nontarget_trials']} other-speaker trials")
    return text


def held_out_scores(speaker_keys: pd.Series, item_ids: pd.Series, vectors: np.ndarray, per_speaker: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores [held-out utterances, speakers], index of each utterance's own speaker, speaker keys):
    cosine of each held-out utterance to every speaker's centroid of its other utterances."""
    held = choose_holdout(speaker_keys, item_ids, per_speaker, seed)
    keys = speaker_keys.to_numpy()
    unit = (vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    enrol_keys, inverse = np.unique(keys[~held], return_inverse=True)
    centroids = group_mean(unit[~held], inverse, np.bincount(inverse, minlength=len(enrol_keys)))
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return unit[held] @ centroids.T, np.searchsorted(enrol_keys, keys[held]), enrol_keys


def evaluate(speaker_keys: pd.Series, item_ids: pd.Series, vectors: np.ndarray, per_speaker: int = 1,
             seed: int = 0, p_target: float = 0.01, threshold: float | None = None) -> dict:
    """Identification top-1 and verification metrics of held-out utterances against centroids of the rest."""
    scores, truth, enrol_keys = held_out_scores(speaker_keys, item_ids, vectors, per_speaker, seed)
    if not len(scores) or len(enrol_keys) < 2:
        return {"speakers": int(len(enrol_keys)), "held_out": int(len(scores)), "top1": None, "eer": None,
                "min_dcf": None, "threshold": threshold, "threshold_rule": "config" if threshold is not None else None,
                "note": "needs at least 2 speakers with a held-out utterance"}
    top1 = float((scores.argmax(axis=1) == truth).mean())
    is_target = np.zeros_like(scores, dtype=bool)
    is_target[np.arange(len(truth)), truth] = True
    metrics = verification_metrics(scores.ravel(), is_target.ravel(), p_target, threshold)
    result = {"speakers": int(len(enrol_keys)), "held_out": int(len(scores)), "top1": top1, "p_target": p_target,
              **metrics}
    return {**result, "threshold_note": describe_threshold(result)}


def plot(speaker_keys: pd.Series, item_ids: pd.Series, vectors: np.ndarray, speaker_vectors: np.ndarray,
         speaker_names: list[str], result: dict, per_speaker: int, seed: int, path) -> None:
    """Two panels: own- and other-speaker score distributions of the held-out trials (the scores behind
    the metrics), and the speakers' embeddings projected on their first two principal components."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    scores, truth, enrol_keys = held_out_scores(speaker_keys, item_ids, vectors, per_speaker, seed)
    if len(scores) and len(enrol_keys) > 1:
        target = np.zeros_like(scores, dtype=bool)
        target[np.arange(len(truth)), truth] = True
        bins = np.linspace(-1, 1, 41)
        left.hist(scores[~target], bins=bins, alpha=0.6, density=True, label="other speakers")
        left.hist(scores[target], bins=bins, alpha=0.6, density=True, label="own speaker")
        left.legend(fontsize=8)
        if result.get("threshold") is not None:
            left.axvline(result["threshold"], color="k", linestyle="--", linewidth=1, label="threshold")
    eer = result.get("eer")
    left.set_title(f"held-out cosine scores (EER {eer:.3f})" if eer is not None else "held-out cosine scores")
    left.set_xlabel("cosine to speaker embedding")
    if len(speaker_vectors) >= 2:
        centred = speaker_vectors - speaker_vectors.mean(axis=0)
        _, _, axes = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ axes[:2].T
        right.scatter(xy[:, 0], xy[:, 1 % xy.shape[1]], s=18)
        for (x, y), name in list(zip(xy[:, :2] if xy.shape[1] > 1 else np.c_[xy, xy], speaker_names))[:40]:
            right.annotate(name, (x, y), fontsize=7)
    right.set_title(f"{len(speaker_vectors)} speaker embeddings, first two principal components")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
