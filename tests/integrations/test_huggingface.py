"""The Hugging Face Trainer with curvopt's callback: a tiny GPT-2 built from a config, byte-level text, CPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import FixedScale, alarm_on_estimate, dense_curvature, layer_params

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

import curvopt  # noqa: E402
from curvopt import CausalLMLoss, CurvatureInputError, CusumMonitor, estimate_curvature  # noqa: E402
from curvopt.integrations.huggingface import STATE_FILE, CurvatureCallback, logits_of, model_loss  # noqa: E402

SEQ = 16


def tiny_gpt2(
    vocab: int = 256, width: int = 16, layers: int = 2, seed: int = 0, positions: int = SEQ, inner: int | None = None
) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        n_inner=inner,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


class ByteText(torch.utils.data.Dataset):
    """Windows of Python's own documentation as bytes (no download), labels = input_ids (Hugging Face style)."""

    def __init__(self, n: int = 64, vocab: int = 256) -> None:
        from pydoc_data.topics import topics

        data = torch.tensor(list(" ".join(topics.values()).encode("utf-8")[: n * SEQ]), dtype=torch.long) % vocab
        self.rows = data.reshape(n, SEQ)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def _args(tmp_path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def _train(tmp_path, callback, *, model=None, resume=None, quiet=True, **overrides):
    model = model if model is not None else tiny_gpt2()
    trainer = Trainer(model=model, args=_args(tmp_path, **overrides), train_dataset=ByteText(), callbacks=[callback])
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


class Recording(CausalLMLoss):
    """The model's own loss, recording the targets every estimate sees."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, logits, targets):
        self.seen.append(targets.detach().clone())
        return super().forward(logits, targets)


def test_estimates_run_at_the_optimizer_steps_on_that_step_s_last_micro_batch(tmp_path):
    model = tiny_gpt2()
    trained_labels: list[torch.Tensor] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: trained_labels.append(kw["labels"].clone()) if "labels" in kw else None, with_kwargs=True
    )
    loss = Recording()
    callback = CurvatureCallback(loss, every=2, probes=2, curvature_batch_size=2, log_path=None)
    trainer = _train(tmp_path, callback, model=model, gradient_accumulation_steps=2)
    history = callback.wrapper.history
    assert [int(h["step"]) for h in history] == [2, 4, 6]  # optimizer steps, not micro-batches
    per_estimate = len(loss.seen) // 3
    for k, optimizer_step in enumerate((2, 4, 6)):
        last_micro = trained_labels[2 * optimizer_step - 1]  # 2 micro-batches per step
        assert torch.equal(loss.seen[k * per_estimate], last_micro[:2])
    rows = [r for r in trainer.state.log_history if "curv/total/trace" in r]
    assert [r["step"] for r in rows] == [2, 4, 6] and all(math.isfinite(r["curv/total/trace"]) for r in rows)


def test_the_default_loss_is_the_model_s_own(tmp_path):
    model = tiny_gpt2()
    batch = ByteText()[0]
    inputs, labels = {"input_ids": batch["input_ids"][None]}, batch["labels"][None].clone()
    labels[0, :3] = -100
    loss_fn, forward = model_loss(model)
    own = model(**inputs, labels=labels).loss
    assert torch.allclose(loss_fn(forward(model, inputs), labels), own, atol=1e-6)
    with pytest.raises(ValueError, match="loss_fn="):
        model_loss(torch.nn.Linear(2, 2))


def test_resume_from_checkpoint_continues_the_uninterrupted_curvature_history(tmp_path):
    def callback():
        return CurvatureCallback(every=1, probes=2, curvature_batch_size=2, monitor=CusumMonitor(warmup=3))

    whole = callback()
    _train(tmp_path / "whole", whole, save_strategy="steps", save_steps=3)
    _train(tmp_path / "cut", callback(), save_strategy="steps", save_steps=3, max_steps=3)
    resumed = callback()
    _train(
        tmp_path / "cut", resumed, resume=str(tmp_path / "cut" / "checkpoint-3"), save_strategy="steps", save_steps=3
    )
    assert [h["step"] for h in resumed.wrapper.history] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert list(resumed.wrapper.history) == list(whole.wrapper.history)
    steps = [r["step"] for r in curvopt.read_jsonl(tmp_path / "cut" / "curvature.jsonl") if r["type"] == "metrics"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the JSONL cut back to the checkpoint: no step logged twice


def test_on_alarm_stop_ends_training(tmp_path, monkeypatch):
    from curvopt import Alarm

    def alarm_at_second(self, step, estimate):
        self.count += 1
        return [Alarm(step, ["lm_head"], 11.0, 10.0)] if self.count == 2 else []

    monkeypatch.setattr(CusumMonitor, "update", alarm_at_second)
    callback = CurvatureCallback(every=2, probes=1, curvature_batch_size=2, on_alarm="stop", log_path=None)
    trainer = _train(tmp_path, callback)
    assert trainer.state.global_step == 4 and len(callback.wrapper.alarms) == 1


def test_on_alarm_rollback_restores_the_state_before_the_change_point_and_ends_training(tmp_path, monkeypatch):
    from curvopt import Alarm

    def alarm_at_third(self, step, estimate):  # estimates at steps 1, 2, 3; the change began at step 2
        self.count += 1
        return [Alarm(step, ["lm_head"], 11.0, 10.0, onset_step=2)] if self.count == 3 else []

    monkeypatch.setattr(CusumMonitor, "update", alarm_at_third)
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = CurvatureCallback(every=1, probes=1, curvature_batch_size=2, on_alarm="rollback", log_path=None)
    trainer = _train(tmp_path, callback, model=model)
    assert trainer.state.global_step == 3 and len(callback.wrapper.alarms) == 1
    assert callback.session.rollback.restored == [(3, 1)]  # the snapshot before step 1's update: the last before 2
    assert callback.session.rollback.average.halflife == 8  # half an epoch: 64 rows in batches of 4
    for key, value in model.state_dict().items():  # steps 1 and 2 undone, step 3's update dropped
        assert torch.equal(value, before[key]), key
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert not any(inner.state.values())  # AdamW's moments of steps 1 and 2 restored away with the weights
    with pytest.raises(ValueError, match=r"on_alarm must be one of \('warn', 'stop', 'rollback'\), got 'restore'"):
        CurvatureCallback(on_alarm="restore")
    with pytest.raises(ValueError, match="rollback_keep must be >= 3"):
        CurvatureCallback(on_alarm="rollback", rollback_keep=1)
    with pytest.raises(ValueError, match="rollback_average must be a positive number of epochs or None, got 0"):
        CurvatureCallback(on_alarm="rollback", rollback_average=0)


@pytest.mark.parametrize("average", [None, 0.5], ids=["weights", "average"])
def test_rollback_from_the_trainer_s_own_checkpoints(tmp_path, monkeypatch, average):
    from safetensors.torch import load_file

    # estimates at steps 1..5, the alarm at the fifth; the change began at step 4
    monkeypatch.setattr(CusumMonitor, "update", alarm_on_estimate(5, onset=4, layer="lm_head"))
    model = tiny_gpt2()
    callback = CurvatureCallback(
        every=1,
        probes=1,
        curvature_batch_size=2,
        on_alarm="rollback",
        rollback_from="checkpoints",
        rollback_average=average,
        log_path=None,
    )
    trainer = _train(tmp_path, callback, model=model, save_strategy="steps", save_steps=1)
    assert trainer.state.global_step == 5 and callback.session.checkpoint_rollback.restored == [(5, 2)]
    folder = tmp_path / "checkpoint-2"  # the state before update 3: the last checkpoint before the change at 4
    if average is None:
        expected = load_file(folder / "model.safetensors")
    else:
        expected = torch.load(folder / STATE_FILE, weights_only=False)["rollback_average"]["state"]
        assert callback.session.checkpoint_rollback.average.halflife == 8
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    with pytest.raises(ValueError, match="rollback_from must be one of"):
        CurvatureCallback(on_alarm="rollback", rollback_from="disk")


def test_bf16_training_and_a_frozen_model_probe_only_the_trainable_layers(tmp_path):
    model = tiny_gpt2()
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("transformer.h.1.")  # LoRA-style: most of the model frozen
    callback = CurvatureCallback(every=3, probes=2, curvature_batch_size=2, log_path=None)
    _train(tmp_path, callback, model=model, bf16=True)
    layers = [b.name for b in callback.wrapper.layer_blocks]
    assert layers and all(name.startswith("transformer.h.1.") for name in layers)
    last = callback.wrapper.last_estimate
    assert last is not None and all(math.isfinite(v) for v in last.trace.values())


def test_metrics_reach_the_reporting_integrations(tmp_path):
    """The callback runs ahead of the report_to callbacks, so what it adds to a log row reaches them."""
    seen = []

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs or {}))

    callback = CurvatureCallback(every=2, probes=1, curvature_batch_size=2, log_path=None)
    trainer = Trainer(
        model=tiny_gpt2(), args=_args(tmp_path), train_dataset=ByteText(), callbacks=[Reporter(), callback]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert [row["curv/total/trace"] for row in seen if "curv/total/trace" in row]  # reached a callback listed before


def test_causal_lm_closed_form_matches_dense_float64_references():
    model = tiny_gpt2(vocab=12, width=8, layers=1, positions=6, inner=8).double()  # 636 parameters
    rows = ByteText(n=3, vocab=12).rows[:, :6]
    labels = rows.clone()
    labels[0, 1] = -100  # an ignored position
    inputs = {"input_ids": rows}
    loss_fn = CausalLMLoss()
    dense = dense_curvature(model, loss_fn, (inputs, labels), layer_params(model), forward=logits_of)
    est = estimate_curvature(
        model,
        loss_fn,
        (inputs, labels),
        forward=logits_of,
        probes=1500,
        strategy="func-vmap",
        chunk_size=500,
        generator=torch.Generator().manual_seed(0),
    )
    for layer in est.layers:
        for value, se, matrix in ((est.trace, est.trace_se, dense.H), (est.gn_trace, est.gn_trace_se, dense.G)):
            exact = float(dense.block(matrix, layer).trace())
            assert abs(value[layer] - exact) < 4 * se[layer] + 1e-9, (layer, value[layer], exact, se[layer])
        gap = float(dense.rows(dense.T, layer).norm() / dense.rows(dense.G, layer).norm())
        assert est.gn_gap[layer] == pytest.approx(gap, rel=0.15), layer


def test_the_closed_form_is_the_one_used_and_slices_along_the_batch():
    from curvopt.engine.output_hessian import OutputHessian

    logits, labels = torch.randn(4, 6, 11), torch.randint(0, 11, (4, 6))
    assert OutputHessian(CausalLMLoss(), logits, labels).kind == "causal-lm"
    model = tiny_gpt2(vocab=32)
    batch = ({"input_ids": ByteText(n=8, vocab=32).rows}, ByteText(n=8, vocab=32).rows)
    opt = curvopt.CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        model,
        CausalLMLoss(),
        every=1,
        probes=1,
        curvature_batch_size=3,
        forward=logits_of,
    )
    opt.step(batch=batch)
    assert opt.last_estimate.batch_size == 3  # inputs and [B, T] labels sliced along B together


def test_the_loss_as_output_trap_and_cross_entropy_on_sequences_name_the_fix():
    model = tiny_gpt2(vocab=32)
    rows = ByteText(n=4, vocab=32).rows
    with pytest.raises(CurvatureInputError, match=r"CausalLMLoss\(\)"):  # GN = 0 and GN-Gap = inf silently before
        estimate_curvature(
            model,
            lambda out, y: out,
            ({"input_ids": rows}, rows),
            probes=1,
            forward=lambda m, x: m(**x, labels=x["input_ids"]).loss,
        )
    with pytest.raises(CurvatureInputError, match=r"CausalLMLoss\(shift=False\)"):
        estimate_curvature(model, torch.nn.CrossEntropyLoss(), ({"input_ids": rows}, rows), probes=1, forward=logits_of)


def test_reentrant_checkpointing_raises_at_the_first_step_or_falls_back_under_auto():
    model = tiny_gpt2(vocab=32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    rows = ByteText(n=4, vocab=32).rows
    batch = ({"input_ids": rows}, rows)
    opt = curvopt.CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        model,
        CausalLMLoss(),
        every=1,
        probes=1,
        forward=logits_of,
        strategy="autograd",
    )
    with pytest.raises(curvopt.DoubleBackwardError, match="use_reentrant=False"):
        opt.step(batch=batch)
    opt = curvopt.CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, CausalLMLoss(), every=1, probes=2, forward=logits_of
    )
    with pytest.warns(curvopt.FiniteDifferenceWarning, match="uses finite differences"):
        opt.step(batch=batch)
    assert opt.last_estimate.strategy == "finite-difference" and opt.skipped_estimates == 0


class DtypeRecording(CausalLMLoss):
    """The model's own loss, recording the dtype of the logits the curvature products see (probing forwards only)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def forward(self, logits, targets):
        from curvopt.engine.context import is_probing

        if is_probing():
            self.dtypes.add(logits.dtype)
        return super().forward(logits, targets)


def test_bf16_training_keeps_the_curvature_in_float32(tmp_path):
    """accelerate wraps model.forward in autocast itself: the probing context must call the original forward."""
    loss = DtypeRecording()
    callback = CurvatureCallback(loss, every=2, probes=2, curvature_batch_size=2, log_path=None)
    trainer = _train(tmp_path, callback, bf16=True)
    assert "_original_forward" in trainer.model.__dict__  # the Trainer really trained under accelerate's autocast
    assert loss.dtypes == {torch.float32}
    asked = DtypeRecording()
    _train(
        tmp_path / "asked",
        CurvatureCallback(asked, every=2, probes=2, curvature_batch_size=2, log_path=None, curvature_dtype="bfloat16"),
        bf16=True,
    )
    assert asked.dtypes == {torch.bfloat16}  # unless the user asks for another curvature_dtype


def test_a_short_run_without_a_cadence_chooses_one_and_says_so(tmp_path, capsys):
    callback = CurvatureCallback(probes=1, curvature_batch_size=2, log_path=None)
    _train(tmp_path, callback, max_steps=40, logging_steps=100)
    assert [int(h["step"]) for h in callback.wrapper.history] == list(range(2, 41, 2))  # 20 estimates, not 0
    out = capsys.readouterr().out
    assert "curvature every 2 optimizer steps: 20 estimates in this run (chosen for this 40-step run" in out
    assert "the monitor calibrates on the first 9 (ready at step 18)" in out
    with pytest.warns(RuntimeWarning, match="no memorisation verdict: every 4 or less makes 10"):
        _train(
            tmp_path / "explicit",
            CurvatureCallback(every=10, probes=1, curvature_batch_size=2, log_path=None),
            max_steps=40,
            quiet=False,
        )


def test_every_estimate_reaches_the_trainer_logs_at_its_own_step(tmp_path):
    callback = CurvatureCallback(every=3, probes=1, curvature_batch_size=2)
    trainer = _train(tmp_path, callback, max_steps=12, logging_steps=5)
    rows = [r for r in trainer.state.log_history if "curv/total/trace" in r]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]  # between the Trainer's own rows at 5 and 10, none lost
    assert all(r["curv/step"] == r["step"] for r in rows)
    jsonl = curvopt.read_jsonl(tmp_path / "curvature.jsonl")
    assert [r["step"] for r in jsonl if r["type"] == "metrics"] == [3, 6, 9, 12]
    train = [r for r in jsonl if r["type"] == "train"]  # the Trainer's loss, for reports
    assert {r["step"] for r in train} >= {5, 10} and all(math.isfinite(r["train/loss"]) for r in train)
    from curvopt.reporting.plots import training_figure

    figure = training_figure(jsonl)  # the report's loss panel draws the Trainer's own training loss
    assert "training loss" in [line.get_label() for line in figure.axes[0].get_lines()]


def test_the_rollback_reads_a_sharded_trainer_checkpoint(tmp_path):
    from curvopt.integrations.huggingface import _trainer_weights

    model = tiny_gpt2()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    weights, expected = _trainer_weights(tmp_path), model.state_dict()
    assert weights and all(torch.equal(value, expected[key]) for key, value in weights.items())
    with pytest.raises(ValueError, match="holds no model weights the rollback can read"):
        _trainer_weights(tmp_path / "missing")


def _weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_lr_scaling_scales_the_trainer_s_own_update(tmp_path):
    """AdamW's update is linear in its rate: halving every layer's update is the run at half the rate."""
    options = dict(every=1, probes=1, curvature_batch_size=2, log_path=None)
    halving = CurvatureCallback(lr_scaling=FixedScale(0.5), **options)
    scaled = _weights(_train(tmp_path / "a", halving, learning_rate=1e-2))
    halved = _weights(_train(tmp_path / "b", CurvatureCallback(**options), learning_rate=5e-3))
    full = _weights(_train(tmp_path / "c", CurvatureCallback(**options), learning_rate=1e-2))
    for name, value in scaled.items():
        torch.testing.assert_close(value, halved[name], rtol=1e-4, atol=1e-5)  # rounding: lerp vs lr
    assert any(not torch.allclose(value, full[name], atol=1e-3) for name, value in scaled.items())


def test_the_edge_policy_acts_through_the_callback(tmp_path):
    callback = CurvatureCallback(lr_scaling="edge", every=100, probes=1, curvature_batch_size=2, log_path=None)
    scaled = _weights(_train(tmp_path / "a", callback, learning_rate=0.3))
    bare = _weights(_train(tmp_path / "b", CurvatureCallback(every=100, probes=1, log_path=None), learning_rate=0.3))
    policy = callback.wrapper.lr_policy
    assert policy.measurements >= 2 and policy.products > 0  # its own cadence: steps 1, 2, ... whatever every= says
    assert any(not torch.allclose(value, bare[name]) for name, value in scaled.items())
