"""The CUDA path on a CPU machine: what a GPU run decides, with torch.cuda mocked where it must be.

Resume with fewer GPUs than the checkpoint's, the device under torchrun, the precision a card
gets, the fp16 gradient scaler, compiler errors against out-of-memory errors, DDP compiled as a
whole, batch norms and buffers, encoders leaving the GPU once cached, full training batches.
"""

import re
import threading
from types import SimpleNamespace

import pytest
import torch
from test_step import Linear, batches, trainer

from mmcore.engine import parallel, training
from mmcore.engine.runtime import autocast_dtype, describe_precision, resolve_device
from mmcore.engine.sampling import EpochBatchSampler
from mmcore.engine.step import CompiledModel
from mmcore.errors import MmcoreError


def fake_gpus(monkeypatch, count, capability=(9, 0)):
    """``count`` CUDA devices as far as the engine can tell (no kernel ever runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")


# ---------------------------------------------------------------- 1. RNG states on resume


def test_a_checkpoint_with_every_gpus_rng_state_resumes_on_a_machine_with_fewer(monkeypatch):
    """Checkpoints used to hold every GPU's generator state (4 here); restoring them all on a
    one-GPU machine raised IndexError. Now each process saves and restores its own device's."""
    recorded = [torch.full((8,), gpu, dtype=torch.uint8) for gpu in range(4)]
    state = training._rng_state()  # no CUDA here: python, numpy, torch
    state["cuda"] = recorded
    fake_gpus(monkeypatch, 1)
    restored = []

    def set_rng_state(new_state, device="cuda"):
        index = torch.device(device).index if not isinstance(device, int) else device
        if (index or 0) >= torch.cuda.device_count():
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[index]
        restored.append(new_state)

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    training._set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], recorded[0])

    # what is saved now: this device's state alone, restored as it is
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": recorded[2])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state is saved"))
    saved = training._rng_state()
    assert torch.equal(saved["cuda"], recorded[2])
    training._set_rng_state(saved)
    assert torch.equal(restored[-1], recorded[2])

    # no GPU at all: the CUDA state is left alone
    fake_gpus(monkeypatch, 0)
    restored.clear()
    training._set_rng_state(state)
    assert restored == []


# ---------------------------------------------------------------- 2. the device under torchrun


def test_under_torchrun_the_local_rank_picks_the_gpu_and_a_contradicting_device_is_one_line(monkeypatch, capsys):
    fake_gpus(monkeypatch, 2)
    for key, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    assert resolve_device("cuda:0") == torch.device("cuda", 1)
    assert capsys.readouterr().err == (
        "warning: train.device = 'cuda:0' under torchrun: this process (LOCAL_RANK=1) uses cuda:1, "
        'the GPU of its local rank (use "auto" or "cuda")\n'
    )
    for name in ("auto", "cuda", "cuda:1"):
        assert resolve_device(name) == torch.device("cuda", 1)
    assert capsys.readouterr().err == ""
    assert resolve_device("cpu") == torch.device("cpu")


def test_one_process_takes_the_device_it_is_given_and_refuses_one_that_is_not_there(monkeypatch):
    fake_gpus(monkeypatch, 2)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(MmcoreError) as caught:
        resolve_device("cuda:3")
    assert str(caught.value) == "train.device: 'cuda:3' requested but this machine has 2 CUDA device(s) (cuda:0 to cuda:1)"


# ---------------------------------------------------------------- 3. precision by capability


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_is_bf16_where_the_card_computes_it_else_fp16(monkeypatch, capability, expected):
    fake_gpus(monkeypatch, 1, capability)
    cuda = torch.device("cuda", 0)
    assert autocast_dtype("auto", cuda) is expected
    assert autocast_dtype("bf16", cuda) is torch.bfloat16 and autocast_dtype("fp16", cuda) is torch.float16
    assert autocast_dtype("fp32", cuda) is None and autocast_dtype("auto", torch.device("cpu")) is None
    name = "fp16" if expected is torch.float16 else "bf16"
    why = "no native bf16 (needs 8.0)" if expected is torch.float16 else "bf16 native"
    scaler = " with a gradient scaler" if expected is torch.float16 else ""
    assert describe_precision("auto", expected, cuda) == (
        f"precision: {name} autocast{scaler} on Tesla V100-SXM2-16GB, compute capability "
        f"{capability[0]}.{capability[1]}: {why} (train.precision = 'auto')"
    )


def test_the_fp16_step_scales_the_loss_unscales_before_clipping_and_skips_an_inf_step():
    """fp16 autocast on the CPU with torch's own GradScaler (the CUDA one is the same class)."""
    model = Linear()
    run = trainer(model, grad_clip=1e6, log_every=1)
    run.step = type(run.step)(model, run.optimizer, run.step.scheduler, run.step.loss_fn,
                              device=torch.device("cpu"), dtype=torch.float16, grad_clip=1e6)
    scaler = run.step.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.get_scale() == 65536.0
    data = batches(1)
    reference = Linear()  # the unscaled fp32 gradient of the same batch
    torch.nn.functional.binary_cross_entropy_with_logits(reference(data[0]).logit.float(), data[0]["label"]).backward()
    expected_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in reference.parameters()]))
    before = [p.detach().clone() for p in model.parameters()]
    run.step.micro_step(data[0], weight=1.0, sync=True)
    _, norm = run.step.optimizer_step()
    assert norm == pytest.approx(float(expected_norm), rel=1e-2)  # clipping saw true gradients, not x65536
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # an inf gradient: the optimizer step is skipped and the scale halves
    hook = model.fc.weight.register_hook(lambda grad: grad * float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    run.step.micro_step(data[0], weight=1.0, sync=True)
    run.step.optimizer_step()
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 32768.0


def _training_run(registry, demo_data, tmp_path, name, **train):
    from tiny import tiny_recipe_data

    from mmcore.data.csvs import load_splits
    from mmcore.recipe import recipe_from_dict
    from mmcore.scoring.run import score_split

    data = tiny_recipe_data(demo_data, train=train, cache={"dir": str(tmp_path / "cache")}, logging={"tensorboard": False})
    recipe = recipe_from_dict(data, registry=registry)
    run_dir = tmp_path / name
    run_dir.mkdir()
    return training.TrainingRun(recipe, registry, load_splits(recipe.data), run_dir, "tiny.toml", False, print,
                                score_split=score_split)


def test_fp16_keeps_its_loss_scale_in_last_ckpt_and_results_say_what_ran(registry, demo_data, tmp_path):
    run = _training_run(registry, demo_data, tmp_path, "a", precision="fp16", batch_size=24)
    scaler = run.trainer.step.scaler
    scaler.scale(torch.ones(()))  # the scale is made at the first step
    scaler.update(new_scale=torch.tensor(1024.0))
    state = run.state_dict(epoch_complete=True)
    assert state["grad_scaler"]["scale"] == 1024.0
    resumed = _training_run(registry, demo_data, tmp_path, "b", precision="fp16", batch_size=24)
    resumed.load_state(state)
    assert resumed.trainer.step.scaler.get_scale() == 1024.0
    results = run.fit()
    assert results["precision"] == "fp16"
    # 64 training rows in global batches of 24: two full batches, the partial third left out
    assert results["train_batch"] == {"global": 24, "per_process": 24, "processes": 1, "drop_last": True}
    assert len(run.train_loader) == 2 and all(len(batch) == 24 for batch in run.batch_sampler)
    assert results["feature_cache"] == {"vision": True, "text": True, "vision_storage": "vector"}
    assert "grad_scaler" not in _training_run(registry, demo_data, tmp_path, "c").state_dict(epoch_complete=True)


# ---------------------------------------------------------------- 4. compiler errors only


def _counting_backend(counter):
    def backend(graph, example_inputs):
        counter.append(graph)
        return graph.forward

    return backend


def test_an_out_of_memory_error_in_a_compiled_forward_is_not_swallowed():
    def backend(graph, example_inputs):
        def run(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        return run

    torch._dynamo.reset()
    said = []
    model = CompiledModel(Linear(), said.append, backend=backend)
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        model(batches(1)[0])
    assert said == [] and model.guarded.compiled is not None  # still compiled: nothing fell back


def test_a_bug_in_the_model_propagates_from_the_compiled_forward():
    torch._dynamo.reset()
    said = []
    model = CompiledModel(Linear(), said.append, backend=_counting_backend([]))
    with pytest.raises(KeyError, match="'x'"):
        model({"label": torch.zeros(2)})
    assert said == []


def test_a_backend_failure_falls_back_to_eager_with_one_line():
    def backend(graph, example_inputs):
        raise RuntimeError("no working C++ compiler found")

    torch._dynamo.reset()
    said = []
    module = Linear()
    model = CompiledModel(module, said.append, backend=backend)
    batch = batches(1)[0]
    assert torch.equal(model(batch).logit, module(batch).logit)
    model(batch)
    assert len(said) == 1 and re.fullmatch(
        r"train\.compile: torch\.compile failed here \(BackendCompilerFailed: backend='backend' raised:\); "
        r"training uncompiled", said[0]), said


def test_variable_axes_compile_once_for_every_patch_count():
    """NaFlex batches change their patch count; marked dynamic, one graph serves them all."""

    class Patches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 1)

        def forward(self, batch):
            return self.fc(batch["vision"]["pixel_values"]).mean(1).squeeze(-1)

    compiled = {}
    for axes in ((), (("pixel_values", 1),)):
        torch._dynamo.reset()
        graphs = []
        model = CompiledModel(Patches(), pytest.fail, backend=_counting_backend(graphs), variable_axes=axes)
        for patches in (5, 7, 9):
            model({"vision": {"pixel_values": torch.randn(2, patches, 4)}})
        compiled[axes] = len(graphs)
    assert compiled == {(): 2, (("pixel_values", 1),): 1}  # unmarked: compiled again at the second length


# ---------------------------------------------------------------- 7/10. DDP: compiled as a whole, buffers


@pytest.fixture
def one_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_ddp_is_compiled_as_a_whole_and_keeps_no_sync(one_process_group):
    from torch.nn.parallel import DistributedDataParallel

    torch._dynamo.reset()
    model, graphs = Linear(), []
    train = SimpleNamespace(compile=_counting_backend(graphs))
    wrapped = parallel.training_module(model, train, device=torch.device("cpu"), world=2)
    assert isinstance(wrapped, DistributedDataParallel) and wrapped.module is model  # the model inside is plain
    assert wrapped.forward_sync_buffers is False  # nothing in it changes a buffer (torch 2.14's name)
    batch = batches(1)[0]
    with wrapped.no_sync():
        wrapped(batch).logit.sum().backward()
    assert graphs and model.fc.weight.grad is not None  # the compiled DDP forward ran
    assert torch.allclose(wrapped(batch).logit, model(batch).logit)


def _with_batchnorm(vision_trains):
    model = torch.nn.Module()
    model.vision = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model.vision.requires_grad_(vision_trains)
    model.head = torch.nn.Linear(4, 1)
    return model


def test_ddp_broadcasts_buffers_only_when_training_changes_them():
    assert parallel.buffers_change_in_training(_with_batchnorm(vision_trains=True)) is True
    frozen = _with_batchnorm(vision_trains=False).eval()
    assert parallel.buffers_change_in_training(frozen) is False  # a frozen encoder stays in eval mode
    assert not any(m.training for m in frozen.modules())  # the modes are left as they were
    assert parallel.buffers_change_in_training(Linear()) is False


# ---------------------------------------------------------------- 10. encoders leave the GPU once cached


def test_frozen_encoders_leave_the_device_once_cached_and_come_back_when_needed(registry, tmp_path, monkeypatch):
    from test_cache import make_recipe

    from mmcore.engine.pipeline import Pipeline

    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: moved.append((self, *args)) or self)
    frozen = Pipeline(make_recipe(registry, tmp_path / "cache"), registry, progress=False)
    model = frozen.model
    assert frozen.encoders_to_offload() == ["vision", "text"]
    assert frozen.offload_cached_encoders() == []  # a CPU run has nothing to free
    frozen.built.device = torch.device("cuda", 0)  # as a GPU run would have it
    moved.clear()
    assert frozen.offload_cached_encoders() == ["vision", "text"]
    assert moved == [(model.vision, "cpu"), (model.text, "cpu")]
    assert frozen.offload_cached_encoders() == []  # once
    moved.clear()
    assert frozen.encoder_on_device("vision") is model.vision  # e.g. the report's saliency
    assert moved == [(model.vision, torch.device("cuda", 0))] and frozen.built.offloaded == {"text"}
    # a vision encoder that trains keeps its place; its text, cached, still goes
    tuned = Pipeline(make_recipe(registry, tmp_path / "cache", freeze_backbone=False, finetune_layers=-1), registry,
                     progress=False)
    assert tuned.encoders_to_offload() == ["text"]


# ---------------------------------------------------------------- 5/7. batches


def test_training_batches_are_full_and_equal_on_every_rank():
    for world in (1, 2, 4):
        ranks = [list(EpochBatchSampler(103, 8, seed=1, rank=r, world_size=world, drop_last=True)) for r in range(world)]
        assert all(len(batches) == 103 // 8 for batches in ranks)
        assert {len(batch) for batches in ranks for batch in batches} == {8 // world}
        for step in zip(*ranks):  # the ranks' slices make whole global batches, no sample twice
            assert len({i for batch in step for i in batch}) == 8
    # without it, the last global batch is partial: 7 samples, 4 and 3 on two ranks (a recompile, uneven ranks)
    tails = [list(EpochBatchSampler(103, 8, seed=1, rank=r, world_size=2))[-1] for r in range(2)]
    assert [len(tail) for tail in tails] == [4, 3]
    # an epoch smaller than one global batch keeps its one batch
    assert [len(b) for b in EpochBatchSampler(5, 8, seed=1, drop_last=True)] == [5]


def test_batch_size_is_global_and_a_small_share_per_gpu_is_said():
    cuda = torch.device("cuda", 0)
    assert parallel.small_batch_warning(32, 8, cuda) == (
        "warning: train.batch_size = 32 is the global batch: 4 per GPU on 8 GPUs, which leaves each GPU mostly "
        "idle; for throughput raise it (e.g. 128 = 16 per GPU) and scale train.learning_rate with it (linear "
        "scaling rule: x4), which mmcore does not do for you (docs/distributed.md)"
    )
    assert parallel.small_batch_warning(128, 8, cuda) is None
    assert parallel.small_batch_warning(32, 1, cuda) is None
    assert parallel.small_batch_warning(32, 8, torch.device("cpu")) is None
    assert parallel.batch_summary(256, 8, True) == {"global": 256, "per_process": 32, "processes": 8, "drop_last": True}


# ---------------------------------------------------------------- 6. host syncs


def test_the_stop_flag_is_asked_of_every_rank_every_few_steps(monkeypatch):
    from mmcore.engine import loop

    asked = []
    monkeypatch.setattr(loop, "is_distributed", lambda: True)
    monkeypatch.setattr(loop, "any_rank", lambda flag: asked.append(flag) or False)
    trainer(Linear()).train_epoch(batches(25), 1, 1)
    assert len(asked) == 3  # steps 10 and 20, and the epoch's last (25)
    asked.clear()
    monkeypatch.setattr(loop, "is_distributed", lambda: False)
    trainer(Linear()).train_epoch(batches(5), 1, 1)
    assert len(asked) == 5  # alone, a check costs nothing: every step


def test_normalize_makes_its_constants_once_per_device():
    from torch.overrides import TorchFunctionMode

    from mmcore.interfaces import Preprocessing

    class Constants(TorchFunctionMode):
        made = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.tensor, torch.as_tensor) and not isinstance(args[0], torch.Tensor):
                Constants.made += 1
            return func(*args, **(kwargs or {}))

    preprocessing = Preprocessing(size=(4, 4), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    preprocessing.normalize(pixels)
    with Constants():
        for _ in range(5):
            out = preprocessing.normalize(pixels)
    assert Constants.made == 0  # torchvision's normalize built two per call, a host-to-device copy each on a GPU
    from torchvision.transforms.v2 import functional as F

    expected = F.normalize(F.to_dtype(pixels, torch.float32, scale=True), list(preprocessing.mean), list(preprocessing.std))
    assert torch.equal(out, expected)


def test_the_cache_fill_reads_no_value_per_batch_and_still_refuses_float16_overflow(registry, tmp_path, demo_data, monkeypatch):
    from test_cache import make_recipe

    from mmcore.data.csvs import read_split
    from mmcore.engine.features import fill_vision_cache, image_keys, vision_store
    from mmcore.engine.pipeline import Pipeline
    from mmcore.store.features import FeatureOverflow

    split = read_split(demo_data / "train.csv", demo_data)
    args = dict(device=torch.device("cpu"), dtype=None, num_workers=0, max_image_pixels=10**8, progress=False)
    reads = {}
    for batch_size in (32, 8):  # 2 and 8 batches
        pipeline = Pipeline(make_recipe(registry, tmp_path / f"cache{batch_size}"), registry, progress=False)
        store = vision_store(tmp_path / f"cache{batch_size}", pipeline.model, dtype=None, pooling_spec="mean")
        keys = image_keys(tmp_path / f"cache{batch_size}", split)
        count = [0]
        for name in ("item", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *a, _original=original, **k):
                if threading.current_thread() is threading.main_thread():
                    count[0] += 1
                return _original(tensor, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)
        fill_vision_cache(pipeline.model, split, store, keys, batch_size=batch_size, **args)
        monkeypatch.undo()
        reads[batch_size] = count[0]
    assert reads[8] == reads[32]  # the overflow check used to read each batch's peak here

    pipeline = Pipeline(make_recipe(registry, tmp_path / "loud"), registry, progress=False)
    pooling = pipeline.model.pooling
    monkeypatch.setattr(pooling, "forward", lambda tokens, mask: torch.full((tokens.shape[0], tokens.shape[2]), 1e5))
    store = vision_store(tmp_path / "loud", pipeline.model, dtype=None, pooling_spec="mean")
    keys = image_keys(tmp_path / "loud", split)
    with pytest.raises(FeatureOverflow) as caught:
        fill_vision_cache(pipeline.model, split, store, keys, batch_size=8, **args)
    assert str(caught.value) == (
        "vision encoder 'fake_cnn' outputs values up to 1e+05, above float16's maximum 65504, which the feature "
        "cache stores; scale its output down or set cache.enabled = false"
    )
    assert len(store.missing(keys, refresh=True)) == len(split)  # no inf stored


# ---------------------------------------------------------------- 8. the disk behind the encoder


def test_a_fill_waiting_on_the_disk_says_so_with_its_figures():
    from mmcore.engine.features import WritePace

    pace = WritePace()
    # 1000 SO400M token rows (1.68 MB each): the disk busy 45 s of a 50 s fill, the encoder waiting 30 s of it
    pace.rows, pace.written, pace.write_s, pace.wait_s, pace.elapsed_s = 1000, 1_680_000_000, 45.0, 30.0, 50.0
    tokens = SimpleNamespace(tokens=True, storage="fp16")
    assert pace.warning(tokens) == (
        "warning: the feature cache's writer did not keep up with the encoder: it wrote 37 MB/s (encoding and "
        "disk), the encoder produced 84 MB/s (1.6 MiB per image, fp16), so the fill waited 60% of its 50 s; "
        "cache.token_storage = 'int8' or 'pooled' writes fewer bytes per image, or give cache.dir a faster disk "
        "(storage unchanged; bench/disk_rate.py measures both, docs/performance.md)"
    )
    pace.wait_s = 2.0  # 4% of the fill: the disk kept up
    assert pace.warning(tokens) is None
    pace.wait_s, pace.elapsed_s = 5.0, 10.0  # too short a fill to say anything
    assert pace.warning(tokens) is None


def test_the_fills_writer_times_the_encoders_waits_and_its_own_writes():
    import time

    from mmcore.engine.features import BackgroundWriter

    class SlowDisk:
        store = SimpleNamespace(description={"stored": "vector", "dim": 4}, tokens=False, storage="fp16")

        def add(self, key, row):
            time.sleep(0.02)

    background = BackgroundWriter(SlowDisk(), depth=1)
    for _ in range(6):
        background.put([b"k"] * 4, (torch.zeros(4, 4, dtype=torch.float16), None), None, peak=None)
    background.close()
    pace = background.pace
    assert pace.rows == 24 and pace.written == 24 * 8  # 4 float16 values per row
    assert pace.write_s >= 24 * 0.02 and pace.wait_s > 0.2  # the encoder waited for the queue most of the time
    line = pace.warning(SlowDisk.store, min_fill_s=0)
    assert line.startswith("warning: the feature cache's writer did not keep up with the encoder: it wrote 0 MB/s")
    assert "vectors are already the smallest form" in line
