"""Carry a curation onto another cluster run, so names follow their clusters, not row numbers.

:func:`carry_over` gives each cluster of the new run the name of the old clusters its tiles came
from, and says in plain lines what moved and what was cleared.

**Tile rule** (the runs share tiles: same store, or the same slide files on the same grid).
``M[i, j]`` counts tiles in old cluster ``i`` and new cluster ``j``; for a class ``X`` (all old
clusters named ``X`` together) its *share* of new cluster ``j`` is ``sum_{i in X} M[i, j] /
sum_i M[i, j]``, over the tiles of ``j`` that had a cluster in the old run (tiles of slides the
old run did not cover neither help nor hurt). ``j`` takes the name ``X`` when that share is at
least ``min_share`` (:data:`MIN_SHARE` = 0.9). So a named cluster that splits gives its name to
every part, a cluster that absorbed foreign tiles keeps its name only while they are at most
10 % of it, and when two names land on one cluster (possible only with ``min_share <= 0.5``) the
one with more tiles there wins and the other is reported.

Why 0.9: ``share`` is the precision of the carried name: of the tiles now under ``X``, at least
``min_share`` were under ``X`` before. When a named cluster lands whole in one new cluster, the
share *is* the IoU of the named tiles before and after, the figure the curation issue asks to be
>= 0.9. Below that the name is cleared with a visible line, which a user can undo by naming the
cluster again, whereas a name carried too far silently exports foreign tiles. Measured on the
sample slide (sample encoder, 246 tissue tiles): when k goes 8 -> 9 / 10 / 12 the green-ink
cluster's parts have share 1.00; across seeds the clusters that really moved have shares
0.54-0.80, the stable ones 0.90-1.00.

**Centroid rule** (a new cluster with no tile in common with the old run, e.g. another store).
The cosine similarity of centroids measured from the old run's mean centroid (the mean of
``k`` centroids, unweighted): features of a ReLU network are all positive, so raw cosines of
unrelated centroids sit at 0.95-1.0 (resnet18-random); centred, they spread over [-1, 1]. A new
cluster takes the name of its most similar old cluster (named or not: an unnamed nearer
neighbour wins) when that cosine is at least ``min_cosine`` (:data:`MIN_COSINE` = 0.9). Measured
across two generated sample slides: green ink <-> green ink 0.98-1.00, blue ink 0.99; ink
against the nearest cluster of the CMU slide (no ink) 0.04 (resnet18-random) and 0.80 (sample
encoder). Requires the same encoder (``EncoderId.same_features``); otherwise such names clear.

Per-tile overrides stay on their tiles (across stores only on slides that are the same file on
the same grid; the others are dropped and reported).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from engine.curation import Curation, TileKey
from engine.store import ClusterRun, FeatureStore

__all__ = [
    "MIN_COSINE",
    "MIN_SHARE",
    "CarryOver",
    "carry_over",
    "centred_cosine",
    "overlap",
    "shared_slides",
]

MIN_SHARE = 0.9
MIN_COSINE = 0.9
_HISTORY = 200  # lines of history kept in a curation
_GRID_KEYS = ("fingerprint", "rows", "cols", "tile_l0", "stride_l0", "dimensions")


class CarryOver(NamedTuple):
    """The curation of the new run and the report, one line per name (``"'ink' → cluster 5"``).

    ``lost``: the lines of ``report`` that say what the user made and the new run lost (a name
    cleared, per-tile overrides dropped): what a caller should show as a warning.
    """

    curation: Curation
    report: list[str]
    lost: list[str]


def overlap(
    old_labels: Mapping[str, np.ndarray],
    new_labels: Mapping[str, np.ndarray],
    k_old: int,
    k_new: int,
) -> np.ndarray:
    """(k_old, k_new) int64: tiles labelled ``i`` in the old run and ``j`` in the new, over the slides of both."""
    m = np.zeros((k_old, k_new), np.int64)
    for sid, old in old_labels.items():
        new = new_labels.get(sid)
        if new is None:
            continue
        if new.shape != old.shape:
            raise ValueError(f"slide {sid!r}: label maps {old.shape} and {new.shape} differ")
        both = (old >= 0) & (new >= 0)
        np.add.at(m, (old[both].astype(np.int64), new[both].astype(np.int64)), 1)
    return m


def centred_cosine(old_centroids: np.ndarray, new_centroids: np.ndarray) -> np.ndarray:
    """(k_new, k_old) cosine of centroids, both measured from the mean of ``old_centroids`` (k_old, dim).

    0 where a centred centroid is (numerically) the centre itself.
    """
    old = np.asarray(old_centroids, np.float64)
    new = np.asarray(new_centroids, np.float64)
    centre = old.mean(0)
    a, b = new - centre, old - centre
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    scale = max(float(np.linalg.norm(centre)), 1.0) * 1e-9
    a = np.where(na > scale, a / np.maximum(na, scale), 0.0)
    b = np.where(nb > scale, b / np.maximum(nb, scale), 0.0)
    return a @ b.T


def shared_slides(
    old_store: FeatureStore, new_store: FeatureStore, slide_ids: list[str]
) -> list[str]:
    """The slides of ``slide_ids`` (from the old store) whose tiles are tiles of the new store too.

    In one store every slide id; across stores, slides with the same id made from the same file
    content on the same grid.
    """
    if _same_store(old_store, new_store):
        return list(slide_ids)
    known = set(new_store.slide_ids())
    out = []
    for sid in slide_ids:
        if sid not in known or sid not in old_store:
            continue
        a, b = old_store.slide(sid).attrs, new_store.slide(sid).attrs
        if a.get("fingerprint") and all(a.get(k) == b.get(k) for k in _GRID_KEYS):
            out.append(sid)
    return out


def carry_over(
    old: Curation,
    store: FeatureStore,
    new_run: str,
    *,
    old_store: FeatureStore | None = None,
    min_share: float = MIN_SHARE,
    min_cosine: float = MIN_COSINE,
    old_data: ClusterRun | None = None,
    new_data: ClusterRun | None = None,
) -> CarryOver:
    """The curation ``old`` (of run ``old.run`` in ``old_store``, default ``store``) carried onto ``new_run``.

    See the module docstring for the rules and thresholds. The old curation is not changed and
    nothing is saved: the caller saves the result (``result.curation.save(store)``) and shows
    ``result.report``. ``old_data`` / ``new_data``: the runs' centroids and labels when the
    caller holds them in memory (the new run possibly not written yet); read from the stores
    otherwise.
    """
    if not 0.0 < min_share <= 1.0:
        raise ValueError(f"min_share must lie in (0, 1], got {min_share}")
    old_store = store if old_store is None else old_store
    old_run = old_store.read_cluster_run(old.run) if old_data is None else old_data
    new_data = store.read_cluster_run(new_run) if new_data is None else new_data
    k_old, k_new = len(old_run.centroids), len(new_data.centroids)
    if k_old != old.k:
        raise ValueError(f"the curation has k={old.k} but run {old.run!r} has k={k_old}")
    shared = shared_slides(old_store, store, sorted(old_run.labels))
    m = overlap(
        {s: old_run.labels[s] for s in shared},
        {s: v for s, v in new_data.labels.items() if s in shared},
        k_old,
        k_new,
    )
    names, selected = old.names, old.selected
    classes = list(dict.fromkeys(n for n in names if n is not None))
    per_class = {x: m[[i for i in range(k_old) if names[i] == x]].sum(0) for x in classes}
    known_tiles = m.sum(0)  # (k_new,) tiles of each new cluster that had a cluster before
    same_encoder = old_store.encoder.same_features(store.encoder)
    cos = centred_cosine(old_run.centroids, new_data.centroids) if same_encoder else None

    new_names: list[str | None] = [None] * k_new
    new_selected = [False] * k_new
    evidence: dict[int, str] = {}
    beaten: dict[str, tuple[int, str, int]] = {}  # name -> (cluster, name that kept it, its tiles)
    for j in range(k_new):
        if known_tiles[j] > 0:
            fits = [x for x in classes if per_class[x][j] >= min_share * known_tiles[j]]
            if not fits:
                continue
            best = max(fits, key=lambda x: (per_class[x][j], -classes.index(x)))
            for x in fits:
                if x != best:
                    beaten[x] = (j, best, int(per_class[best][j]))
            on = sum(m[i, j] for i in range(k_old) if names[i] == best and selected[i])
            new_names[j], new_selected[j] = best, 2 * on >= per_class[best][j]
            evidence[j] = f"cluster {j} is {per_class[best][j] / known_tiles[j]:.0%} '{best}'"
        elif cos is not None:
            i = int(np.argmax(cos[j]))
            if names[i] is not None and cos[j, i] >= min_cosine:
                new_names[j], new_selected[j] = names[i], selected[i]
                evidence[j] = f"cluster {j} centroid cosine {cos[j, i]:.2f}"

    report = [
        _basis(
            old,
            old_store,
            store,
            new_run,
            int(m.sum()),
            k_new - int((known_tiles > 0).sum()),
            min_share,
            min_cosine,
            same_encoder,
        )
    ]
    lost: list[str] = []
    for x in classes:
        line = _name_line(
            x, new_names, per_class[x], known_tiles, evidence, beaten, cos, names, min_share,
            min_cosine,
        )  # fmt: skip
        report.append(line)
        if x not in new_names:  # cleared
            lost.append(line)

    overrides: dict[TileKey, str | None] = {}
    keep = set(shared_slides(old_store, store, old.override_slides()))
    for sid in old.override_slides():
        tiles = old.overrides(sid)
        if sid in keep:
            overrides.update(tiles)
        else:
            report.append(
                f"{len(tiles)} per-tile override(s) on slide {sid!r} dropped: {store.path} "
                "does not hold that slide on the same grid"
            )
            lost.append(report[-1])
    if overrides:
        report.append(f"{len(overrides)} per-tile override(s) stay on their tiles")

    history = [*old.history, f"carried from run {old.run!r} onto {new_run!r}:", *report]
    new = Curation(
        new_run,
        k_new,
        run_created=new_data.attrs.get("created"),
        names=new_names,
        selected=new_selected,
        overrides=overrides,
        history=history[-_HISTORY:],
    )
    return CarryOver(new, report, lost)


def _same_store(a: FeatureStore, b: FeatureStore) -> bool:
    return a is b or Path(a.path).resolve() == Path(b.path).resolve()


def _basis(
    old: Curation,
    old_store: FeatureStore,
    store: FeatureStore,
    new_run: str,
    n_shared: int,
    n_unshared: int,
    min_share: float,
    min_cosine: float,
    same_encoder: bool,
) -> str:
    """The first report line: what the matching could rest on."""
    src = f"run {old.run!r}" + ("" if _same_store(old_store, store) else f" of {old_store.path}")
    parts = []
    if n_shared:
        parts.append(
            f"{n_shared} tiles in common: a name moves to the clusters made >= {min_share:.0%} of its tiles"
        )
    else:
        parts.append("no tile in common")
    if n_unshared:
        if same_encoder:
            parts.append(
                f"{n_unshared} cluster(s) without common tiles matched by centroid (cosine >= {min_cosine:.2f})"
            )
        else:
            parts.append(
                f"{n_unshared} cluster(s) without common tiles stay unnamed (another encoder: "
                "centroids not comparable)"
            )
    return f"{src} -> run {new_run!r}: " + "; ".join(parts)


def _clusters(js: list[int]) -> str:
    return f"cluster {js[0]}" if len(js) == 1 else "clusters " + ", ".join(map(str, js))


def _name_line(
    x: str,
    new_names: list[str | None],
    counts: np.ndarray,
    known_tiles: np.ndarray,
    evidence: dict[int, str],
    beaten: dict[str, tuple[int, str, int]],
    cos: np.ndarray | None,
    old_names: tuple[str | None, ...],
    min_share: float,
    min_cosine: float,
) -> str:
    """One report line for name ``x``: where it went, or why it was cleared.

    ``counts`` (k_new,): tiles of ``x`` in each new cluster; ``known_tiles`` (k_new,): tiles of
    each new cluster that had a cluster in the old run; ``cos`` (k_new, k_old) centred cosines.
    """
    placed = [j for j, n in enumerate(new_names) if n == x]
    total = int(counts.sum())
    if placed:
        how = ", ".join(evidence[j] for j in placed)
        line = f"'{x}' → {_clusters(placed)}"
        if total:
            kept = int(sum(counts[j] for j in placed))
            line += f"{' (split)' if len(placed) > 1 else ''}: {kept} of its {total} tiles ({how})"
            if kept < min_share * total:
                line += (
                    f"; its other {total - kept} tiles are in clusters under another name or none"
                )
        else:
            line += f" ({how})"
        return line
    if x in beaten:
        j, winner, theirs = beaten[x]
        return (
            f"'{x}' landed on cluster {j} with '{winner}', which has more tiles there "
            f"({theirs} vs {int(counts[j])}), and was cleared"
        )
    if total:
        j = int(np.argmax(counts))
        share = counts[j] / max(1, known_tiles[j])
        if new_names[j] is not None:
            return (
                f"'{x}' merged into cluster {j}, which is '{new_names[j]}' ({share:.0%} of it was "
                f"'{x}'), and was cleared"
            )
        return (
            f"'{x}' had no match and was cleared: most of its tiles ({int(counts[j])} of {total}) "
            f"went to cluster {j}, {share:.0%} of which they make ({min_share:.0%} needed)"
        )
    unshared = np.flatnonzero(known_tiles == 0)
    if cos is not None and len(unshared):
        mine = [i for i, n in enumerate(old_names) if n == x]
        sub = cos[np.ix_(unshared, mine)]
        a, b = np.unravel_index(int(np.argmax(sub)), sub.shape)
        j, value = int(unshared[a]), float(sub[a, b])
        if value < min_cosine:
            why = f"nearest cluster {j}, centroid cosine {value:.2f} < {min_cosine:.2f}"
        else:
            i = int(np.argmax(cos[j]))
            other = f"'{old_names[i]}'" if old_names[i] else "unnamed"
            why = f"cluster {j} (cosine {value:.2f}) is nearer old cluster {i} ({other})"
        return f"'{x}' had no match ({why}) and was cleared"
    if cos is None:
        return (
            f"'{x}' had no tile in common with the new run, whose encoder differs (centroids not "
            "comparable), and was cleared"
        )
    return (
        f"'{x}' had no tile on the slides both runs cover, and every new cluster is matched by "
        "its tiles; it was cleared"
    )
