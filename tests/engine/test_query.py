"""engine.query: exact cosine top-k over every tissue tile of a store, chunk by chunk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import HistoclusterError
from engine.progress import Cancelled
from engine.query import QueryConfig, run, similar_tiles, tile_vector
from engine.query import main as query_main
from engine.store import FeatureStore
from tests.engine.clustering_fixtures import real_store, synthetic_store


@pytest.fixture(scope="module")
def multi_store(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    """Two slides of 93 x 70 tiles (3 x 3 chunks each) with random 8-d features."""
    return FeatureStore.open(
        synthetic_store(cmu_svs, tmp_path_factory.mktemp("q") / "f.zarr", ids=("a", "b"))
    )


def _brute_force(store: FeatureStore, q: np.ndarray) -> list[tuple[float, str, int, int]]:
    out = []
    for sid in store.slide_ids():
        sf = store.slide(sid)
        r, c = np.nonzero(sf.selected & np.asarray(sf.done[...]))
        f = sf.read_tiles(r, c)
        sims = f @ q / np.linalg.norm(f, axis=1) / np.linalg.norm(q)
        out += [(float(s), sid, int(i), int(j)) for s, i, j in zip(sims, r, c, strict=True)]
    return sorted(out, key=lambda t: -t[0])


def test_similar_tiles_equal_brute_force_across_slides_and_chunks(
    multi_store: FeatureStore,
) -> None:
    q = np.random.default_rng(1).standard_normal(multi_store.dim).astype(np.float32)
    hits = similar_tiles(multi_store, q * 5.0, top=25)  # scale does not matter
    ref = _brute_force(multi_store, q)[:25]
    assert [(h.slide_id, h.row, h.col) for h in hits] == [(s, r, c) for _, s, r, c in ref]
    np.testing.assert_allclose([h.similarity for h in hits], [s for s, *_ in ref], rtol=1e-5)
    assert {h.slide_id for h in hits} == {"a", "b"}
    rows = {h.row for h in hits}
    assert min(rows) < 32 and max(rows) >= 32  # hits come from several chunks
    h = hits[0]
    assert [h.l0_x, h.l0_y] == multi_store.slide(h.slide_id).origins[h.row, h.col].tolist()


def test_query_tile_is_its_own_best_match_unless_excluded(multi_store: FeatureStore) -> None:
    sf = multi_store.slide("b")
    r, c = (int(v[0]) for v in np.nonzero(sf.selected))
    q = tile_vector(multi_store, "b", r, c)
    best = similar_tiles(multi_store, q, top=1)[0]
    assert (best.slide_id, best.row, best.col) == ("b", r, c)
    assert similar_tiles(multi_store, q, top=1)[0].similarity == pytest.approx(1.0, abs=1e-5)
    hits = similar_tiles(multi_store, q, top=5, exclude=[("b", r, c)], slide_ids=["b"])
    assert len(hits) == 5 and all(h.slide_id == "b" and (h.row, h.col) != (r, c) for h in hits)


def test_bad_query_vectors_are_refused(multi_store: FeatureStore) -> None:
    with pytest.raises(HistoclusterError, match="has 3 values"):
        similar_tiles(multi_store, np.ones(3), top=3)
    with pytest.raises(HistoclusterError, match="zero or not finite"):
        similar_tiles(multi_store, np.zeros(multi_store.dim), top=3)
    with pytest.raises(HistoclusterError, match="not an encoded tissue tile"):
        tile_vector(multi_store, "a", 0, 0)  # the slide's corner is glass


def test_query_cli_on_the_cmu_slide(
    cmu_svs: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    path = real_store(cmu_svs, tmp_path_factory)
    store = FeatureStore.open(path)
    (sid,) = store.slide_ids()
    sf = store.slide(sid)
    r, c = (int(v[0]) for v in np.nonzero(sf.selected & np.asarray(sf.done[...])))
    out = tmp_path / "hits.json"
    assert (
        query_main(
            [
                str(path),
                "--slide",
                sid,
                "--row",
                str(r),
                "--col",
                str(c),
                "--top",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split("\t") == ["rank", "slide_id", "row", "col", "l0_x", "l0_y", "similarity"]
    assert len(lines) == 6
    record = json.loads(out.read_text())
    assert record["top"] == 5 and len(record["hits"]) == 5
    assert all(
        (h["row"], h["col"]) != (r, c) for h in record["hits"]
    )  # the query itself is left out
    ref = _brute_force(store, tile_vector(store, sid, r, c))[1:6]
    assert [(h["row"], h["col"]) for h in record["hits"]] == [(i, j) for _, _, i, j in ref]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--slide", "nope", "--row", "0", "--col", "0"], "no slide 'nope'"),
        (["--row", "999", "--col", "0"], "outside slide"),
        (["--row", "0", "--col", "0"], "not an encoded tissue tile"),
        (["--row", "5", "--col", "4", "--top", "0"], "--top must be at least 1"),
    ],
)
def test_query_cli_errors_are_one_line(
    cmu_svs: Path,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture,
    args: list[str],
    message: str,
) -> None:
    path = real_store(cmu_svs, tmp_path_factory)
    sid = FeatureStore.open(path).slide_ids()[0]
    argv = [str(path), *args] if "--slide" in args else [str(path), "--slide", sid, *args]
    assert query_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_query_run_reports_progress_and_stops_on_cancel(multi_store: FeatureStore) -> None:
    sf = multi_store.slide("a")
    r, c = (int(v[0]) for v in np.nonzero(sf.selected))
    calls: list[tuple[str, int, int]] = []
    cfg = QueryConfig(store=multi_store.path, slide="a", row=r, col=c, top=3)
    result = run(cfg, progress=lambda *a: calls.append(a))
    total = multi_store.n_tissue_tiles()
    assert {s for s, _, _ in calls} == {"query"} and calls[0] == ("query", 0, total)
    assert calls[-1] == ("query", total, total) and len(result.hits) == 3

    seen: list[int] = []

    def cancel(stage: str, done: int, total: int) -> None:
        seen.append(done)
        if done > 0:
            raise Cancelled

    with pytest.raises(Cancelled):
        run(cfg, progress=cancel)
    assert len(seen) == 2 and seen[0] == 0  # stopped at the first report after the start


def test_query_out_is_written_whole(multi_store: FeatureStore, tmp_path: Path) -> None:
    sf = multi_store.slide("b")
    r, c = (int(v[0]) for v in np.nonzero(sf.selected))
    out = tmp_path / "hits.json"
    cfg = QueryConfig(store=multi_store.path, slide="b", row=r, col=c, top=4, slides=["b"], out=out)
    result = run(cfg)
    record = json.loads(out.read_text())
    assert record["slides"] == ["b"] and record["out"] == str(out) and result.out == out
    assert [h["row"] for h in record["hits"]] == [h.row for h in result.hits]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hits.json"]  # no temporary left
