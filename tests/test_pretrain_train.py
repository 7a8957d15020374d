"""Trainer end to end on CPU with the micro config: overfitting, exact resume, DDP equivalence, export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.pretrain_data import write_shards
from vesl.errors import UserError

MODEL = "vesl-micro-vit"


def _losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """32 images, 200 steps (batch 8, 50 epochs) of the full CLOC objective."""
    from vesl.pretrain.train import TrainConfig, train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("overfit")
    write_shards(root / "data", 32, n_files=2, row_group_size=8, seed=0)
    cfg = TrainConfig(data=str(root / "data"), out=str(root / "run"), model=MODEL, batch_size=8, workers=0, epochs=50,
                      lr=3e-3, warmup=10, log_every=50, save_every=1000, tensorboard=True)
    return train(cfg), root / "data"


def test_overfit_cuts_region_loss_and_grounding_beats_whole_image(overfit_run):
    from vesl.pretrain import load
    from vesl.pretrain.data import BatchBuilder, Preprocess, letterbox_box
    from vesl.schemas.boxes import box_iou
    from vesl.schemas.dataset import training_shards

    run, data = overfit_run
    log = _losses(run)
    assert max(log) == 200
    first = sum(log[s]["region"] for s in range(1, 5)) / 4
    last = sum(log[s]["region"] for s in range(197, 201)) / 4
    assert last <= 0.5 * first, (first, last)
    assert any((run / "tb").iterdir())

    import pyarrow.parquet as pq

    model = load(run)
    builder = BatchBuilder(model.tokenizer, Preprocess.from_model(model), 32, 4)
    rows = [r for p in training_shards(str(data)) for r in pq.read_table(p).to_pylist()]
    batch = builder.build(rows, 0)
    rv = batch["region_valid"]
    b_idx = rv.nonzero()[:, 0]
    with torch.no_grad():
        pred = model.ground(batch["images"][b_idx], batch["region_texts"][rv])
    gt = batch["region_boxes"][rv].tolist()
    ours = sum(box_iou(p, g) for p, g in zip(pred.tolist(), gt, strict=True)) / len(gt)
    whole = sum(box_iou(letterbox_box([0, 0, 1, 1], rows[i]["width"], rows[i]["height"], builder.pre.size), g)
                for i, g in zip(b_idx.tolist(), gt, strict=True)) / len(gt)
    assert ours > whole + 0.1, (ours, whole)


def test_export_loads_back_through_open_clip_and_vesl(overfit_run, tmp_path):
    import open_clip

    from vesl.pretrain import load
    from vesl.pretrain.export import export_model
    from vesl.pretrain.model import register_model_configs

    run, _ = overfit_run
    out = export_model(run, tmp_path / "export")
    original = load(run)
    exported = load(out)
    via_dir = open_clip.create_model(f"local-dir:{out}").eval()
    register_model_configs()
    via_file = open_clip.create_model(MODEL, pretrained=str(out / "open_clip_model.safetensors")).eval()
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    txt = original.tokenizer(["a red circle", "a blue square"])
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5]], [[0.4, 0.2, 0.9, 0.7]]])
    with torch.no_grad():
        ref_i, ref_t = original.encode_image(img), original.encode_text(txt)
        for m in (via_dir, via_file):
            assert torch.equal(m.encode_image(img, normalize=True), ref_i)
            assert torch.equal(m.encode_text(txt, normalize=True), ref_t)
        assert torch.equal(exported.encode_image(img), ref_i)
        assert torch.equal(exported.encode_regions(img, boxes), original.encode_regions(img, boxes))
        assert torch.equal(exported.ground(img, txt), original.ground(img, txt))


def test_eval_of_a_plain_open_clip_model_gives_the_clip_baselines_of_the_same_weights(overfit_run, tmp_path):
    from tests.pretrain_data import write_coco
    from vesl.pretrain.eval import evaluate
    from vesl.pretrain.export import export_model

    run, data = overfit_run
    out = export_model(run, tmp_path / "export")
    coco = write_coco(tmp_path / "coco", 6)
    kw = {"coco_annotations": str(coco), "coco_images": str(coco.parent / "images"), "shards": str(data)}
    ours = evaluate(str(run), **kw)
    plain = evaluate(MODEL, pretrained=str(out / "open_clip_model.safetensors"), **kw)
    assert set(plain["region_classification"]) == {"roi_align", "crop"}  # no Prompter: its weights are untrained
    for m in ("roi_align", "crop"):
        assert plain["region_classification"][m] == ours["region_classification"][m]
    assert "region2text_R@10" not in plain["shards"]
    for k in ("i2t_R@1", "t2i_R@5"):
        assert plain["shards"][k] == ours["shards"][k]


def test_cli_eval_reproduces_the_demo_evaluation(overfit_run, tmp_path):
    """One definition of region classification: `vesl eval` with its defaults gives `vesl demo --full`'s numbers."""
    from tests.pretrain_data import write_coco
    from vesl.demo.runner import _evaluate
    from vesl.pretrain.eval import METHODS

    run, _ = overfit_run
    coco = write_coco(tmp_path / "coco", 6)
    out = tmp_path / "res.json"
    r = subprocess.run([str(Path(sys.executable).parent / "vesl"), "eval", str(run), "--coco-annotations", str(coco),
                        "--coco-images", str(coco.parent / "images"), "--out", str(out)],
                       capture_output=True, text=True, check=False, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    cli = json.loads(out.read_text())
    demo = _evaluate(run, coco, METHODS, grounding=True)
    assert cli["templates"] == ["a {}", "a small {}", "a large {}"]
    for m in METHODS:
        assert cli["region_classification"][m]["mAcc"] == pytest.approx(100 * demo[f"{m}_macc"], abs=1e-9)
    assert cli["coco_grounding_acc@0.5"] == pytest.approx(100 * demo["grounding_acc"], abs=1e-9)


def test_eval_names_what_to_pass_for_an_unknown_model(tmp_path, monkeypatch, capsys):
    from vesl.cli import main

    monkeypatch.setattr(sys, "argv", ["vesl", "eval", "no-such-model", "--coco-annotations", "a.json",
                                      "--coco-images", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "neither an existing path nor an open_clip model name" in err
    assert len(err.splitlines()) == 1


def test_exact_resume_is_bitwise(tmp_path):
    """Kill after step 3 (mid-epoch, worker 1 due next), resume: steps 4..n match the uninterrupted run."""
    from vesl.pretrain.train import TrainConfig, train

    torch.set_num_threads(1)
    write_shards(tmp_path / "data", 18, n_files=3, row_group_size=2, seed=5)  # 9 units: workers get 5 and 4
    base = {"data": str(tmp_path / "data"), "model": MODEL, "batch_size": 4, "workers": 2, "epochs": 2, "lr": 2e-3,
            "warmup": 2, "save_every": 1000, "tensorboard": False, "log_every": 100}
    full = train(TrainConfig(out=str(tmp_path / "full"), **base))
    part = tmp_path / "part"
    train(TrainConfig(out=str(part), stop_after=3, **base))
    assert max(_losses(part)) == 3
    train(TrainConfig(out=str(part), resume="latest", **base))
    a, b = _losses(full), _losses(part)
    assert max(a) == max(b) >= 8
    for s in range(1, max(a) + 1):
        for k in ("loss", "clip", "region", "ground"):
            assert a[s][k] == b[s][k], (s, k, a[s][k], b[s][k])


def test_threads_pins_the_run_and_the_caller_gets_its_own_count_back(tmp_path):
    """``threads: 1`` trains as a one-thread process would, whatever the caller set, and an in-process caller (the
    demo trains right after labeling and probes after training) goes on with its own count."""
    from vesl.pretrain.train import TrainConfig, train

    write_shards(tmp_path / "data", 8, n_files=1, row_group_size=8, seed=1)
    base = {"data": str(tmp_path / "data"), "model": MODEL, "batch_size": 4, "workers": 0, "epochs": 2, "lr": 2e-3,
            "warmup": 1, "save_every": 1000, "tensorboard": False, "log_every": 100}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = train(TrainConfig(out=str(tmp_path / "one"), **base))
        torch.set_num_threads(3)
        pinned = train(TrainConfig(out=str(tmp_path / "pinned"), threads=1, **base))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    a, b = _losses(one), _losses(pinned)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s][k] == b[s][k] for s in a for k in ("loss", "clip", "region", "ground"))


def test_loader_sees_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path):
    from vesl.pretrain.data import Preprocess, RegionTextLoader, assign_units, scan_units
    from vesl.pretrain.model import get_tokenizer

    write_shards(tmp_path, 22, n_files=3, row_group_size=3, seed=2)
    tok = get_tokenizer(MODEL)
    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    all_keys = {f"s2-{i:06d}" for i in range(22)}
    for epoch in (0, 1):
        seen, steps = [], []
        for rank in (0, 1):
            ld = RegionTextLoader(str(tmp_path), batch_size=3, tokenizer=tok, preprocess=pre, num_workers=2, rank=rank,
                                  world_size=2, seed=7)
            batches = list(ld.epoch(epoch))
            steps.append(len(batches))
            seen += [k for bt in batches for k, v in zip(bt["keys"], bt["image_valid"], strict=False) if v]
        assert steps[0] == steps[1]
        assert sorted(seen) == sorted(all_keys)
    units = scan_units(RegionTextLoader(str(tmp_path), batch_size=3, tokenizer=tok, preprocess=pre, num_workers=0).paths)
    with pytest.raises(UserError, match=r"only \d+ data units .* for 16 loader workers"):
        assign_units(units, 0, 0, world_size=4, num_workers=4)


def test_trainer_lists_files_row_groups_and_columns_through_the_dataset_module(tmp_path):
    """A directory, a glob, a file or a list of them; errors shards skipped; fsspec URLs stay URLs; a row
    group's rows carry the trainer's columns only; a broken shard is a one-line error naming it."""
    import fsspec

    from vesl.schemas.dataset import TRAINING_COLUMNS, read_row_group, row_group_sizes, training_shards

    a, b = write_shards(tmp_path / "d", 10, n_files=2, row_group_size=3)
    (tmp_path / "d" / "part-00000.errors.parquet").write_bytes(b"not parquet")
    assert training_shards(str(tmp_path / "d")) == [str(a), str(b)]
    assert training_shards([str(tmp_path / "d" / "*-00001.parquet"), str(a)]) == [str(b), str(a)]
    assert row_group_sizes(str(a)) == [3, 2]
    rows = read_row_group(str(a), 1)
    assert len(rows) == 2
    assert tuple(rows[0]) == TRAINING_COLUMNS
    fs = fsspec.filesystem("memory")
    fs.pipe("/vesl-train-test/part-00000.parquet", a.read_bytes())
    [url] = training_shards("memory://vesl-train-test")
    assert url.startswith("memory://")
    assert row_group_sizes(url) == [3, 2]
    fs.rm("/vesl-train-test", recursive=True)
    broken = tmp_path / "e" / "part-00000.parquet"
    broken.parent.mkdir()
    broken.write_bytes(a.read_bytes()[:100])
    with pytest.raises(UserError, match="not a readable Parquet file") as e:
        row_group_sizes(str(broken))
    assert str(broken) in str(e.value)
    assert "\n" not in str(e.value)


def test_loader_workers_persist_across_epochs_and_give_each_epoch_its_own_order(tmp_path):
    """One loader over three epochs (the first left half-read) reuses its two worker processes, and every epoch
    gives exactly the batches a fresh loader gives for that epoch; close() stops the workers."""
    from vesl.pretrain.data import Preprocess, RegionTextLoader
    from vesl.pretrain.model import get_tokenizer

    write_shards(tmp_path, 20, n_files=2, row_group_size=2, seed=3)
    tok = get_tokenizer(MODEL)
    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def loader():
        return RegionTextLoader(str(tmp_path), batch_size=3, tokenizer=tok, preprocess=pre, num_workers=2, seed=4,
                                position_share=0.5)

    def keys(batches):
        return [(tuple(b["keys"]), b["region_texts"].sum().item()) for b in batches]

    ld = loader()
    it = ld.epoch(0)
    half = [next(it) for _ in range(2)]  # epoch 0 stopped early (as a run that reaches max_steps mid-epoch)
    pids = [w.pid for w in ld._loader._iterator._workers]
    seen = {e: keys(ld.epoch(e)) for e in (1, 2)}
    workers = ld._loader._iterator._workers
    assert [w.pid for w in workers] == pids
    assert all(w.is_alive() for w in workers)
    for e in (1, 2):
        fresh = loader()
        assert seen[e] == keys(fresh.epoch(e)), e
        fresh.close()
    assert {k for ks, _ in seen[1] for k in ks} == {f"s3-{i:06d}" for i in range(20)}
    assert seen[1] != seen[2]
    first = loader()
    assert keys(half) == keys(first.epoch(0))[:2]
    first.close()
    ld.close()
    assert not any(w.is_alive() for w in workers)


def test_cached_phrase_tokens_are_the_tokenizers_own_rows_across_batches_and_cache_resets(monkeypatch):
    """The loader tokenizes each distinct region phrase once; every batch must still hold exactly what the
    tokenizer gives for that batch's phrases, also when the cache fills and starts over."""
    from vesl.pretrain import data
    from vesl.pretrain.data import BatchBuilder, Preprocess
    from vesl.pretrain.model import get_tokenizer

    tok = get_tokenizer(MODEL)
    builder = BatchBuilder(tok, Preprocess(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), 2, 3)
    monkeypatch.setattr(data, "PHRASE_CACHE_SIZE", 4)
    batches = [["a red circle", "", "the sky", "a red circle", "two blue squares", ""],
               ["the sky", "a red circle", "", "", "", ""],
               ["x", "y", "z", "w", "a red circle", "the sky"],  # overflows the cache of 4: starts over
               ["a red circle", "two blue squares", "y", "", "the sky", "w"]]
    for phrases in batches:
        got = builder._phrase_tokens(phrases, 2, 3)
        assert got.shape == (2, 3, tok.context_length)
        assert torch.equal(got, tok(phrases).view(2, 3, -1))
        assert len(builder._phrase_cache) <= max(4, len(set(phrases)))  # one batch may hold more


def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo) vs one process on the same global batches: losses within 1e-5."""
    from vesl.pretrain.data import BatchBuilder, Preprocess
    from vesl.pretrain.losses import CLOCLoss
    from vesl.pretrain.model import PrompterConfig, create_model
    from vesl.pretrain.train import TrainConfig, cosine_lr, make_optimizer
    from vesl.schemas.dataset import training_shards

    write_shards(tmp_path / "data", 18, n_files=3, row_group_size=2, seed=9)  # 9 units for 4 global workers
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "ddp"), model=MODEL, batch_size=4, workers=2,
                      epochs=2, lr=2e-3, warmup=2, save_every=1000, tensorboard=False, log_every=100, local_loss=True,
                      gather_with_grad=True, record_keys=True)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "vesl.pretrain.train", str(cfg_path)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    log = _losses(run)
    keys = [[json.loads(x) for x in (run / f"keys-rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    n = max(log)
    assert len(keys[0]) == len(keys[1]) == n

    import pyarrow.parquet as pq

    rows = {r["key"]: r for p in training_shards(str(tmp_path / "data")) for r in pq.read_table(p).to_pylist()}
    # every sample exactly once per epoch, across both ranks and their workers
    for epoch in (0, 1):
        seen = [k for r in (0, 1) for rec in keys[r] if log[rec["step"]]["epoch"] == epoch for k in rec["keys"]]
        assert sorted(seen) == sorted(rows)

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model(MODEL, None, PrompterConfig(), seed=cfg.seed)
    builder = BatchBuilder(model.tokenizer, Preprocess.from_model(model), cfg.batch_size, cfg.regions_per_image,
                           seed=cfg.seed)
    opt = make_optimizer(model, cfg)
    loss_fn = CLOCLoss(lam=cfg.lam, text_sim_threshold=cfg.text_sim_threshold, ground_loss=cfg.ground_loss,
                       region_weight=cfg.region_weight, ground_weight=cfg.ground_weight,
                       cell_weight=cfg.ground_cell_weight)
    for step in range(1, n + 1):
        epoch = log[step]["epoch"]
        parts = [builder.build([rows[k] for k in keys[r][step - 1]["keys"]], epoch) for r in (0, 1)]
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if isinstance(parts[0][k], torch.Tensor)}
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step - 1, cfg.lr, cfg.warmup, n)
        out = model(batch["images"], batch["texts"], batch["region_boxes"], batch["region_texts"], batch["region_valid"])
        losses = loss_fn(out, batch)
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        for k in ("loss", "clip", "region", "ground"):
            assert losses[k].item() == pytest.approx(log[step][k], abs=1e-5), (step, k)


def test_cli_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from vesl.cli import main

    monkeypatch.setattr(sys, "argv", ["vesl", "train", "--data", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: training data")
    assert len(err.splitlines()) == 1
