"""Continuous batching: per-row sampling == `process_logits`, the layer-unrolled decode model ==
the scanned one, engine/scheduler tokens == `generate` on each request alone (dense and
capacity-factor MoE LMs, batched prefills), a batched prefill's rows == single prefills,
prefilled requests waiting for slots (and cancelled there), stop tokens, streaming order, no
recompilation after warm-up, request/overflow errors, futures across threads, stop() with
pending requests."""

import asyncio
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.inference.engine import Engine, default_buckets
from nexus_jax.inference.generate import Sampling, generate, process_logits, sample
from nexus_jax.inference.row_sampling import RowSampling, process_logits_rows, sample_rows
from nexus_jax.inference.scheduler import DecodeServer, ServerStopped
from nexus_jax.models import decoding
from nexus_jax.models.lm import LanguageModel

V, MAX_LEN, SLOTS, N_REF = 32, 40, 4, 12
BUCKETS = (8, 24)


def _lm(**kw):
  model = LanguageModel.from_preset("tiny", vocab_size=V, embed_dim=32, mlp_dim=32, **kw)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return model, params


@pytest.fixture(scope="module")
def dense():
  model, params = _lm(num_experts=0)
  return (
      model,
      params,
      Engine(model, params, num_slots=SLOTS, max_len=MAX_LEN, prefill_buckets=BUCKETS),
  )


def _requests(n=16, seed=0):
  """Mixed requests: prompt lengths 3 / 13 (both buckets), 1..12 new tokens, greedy or seeded
  sampling with top-k and top-p."""
  rng = np.random.default_rng(seed)
  settings = [dict(), dict(temperature=0.9, top_k=6, top_p=0.9)]
  out = []
  for i in range(n):
    prompt = rng.integers(0, V, (3, 13)[(i // 2) % 2]).tolist()
    out.append((prompt, int(rng.integers(1, N_REF + 1)), {**settings[i % 2], "seed": i}))
  return out


def _alone(model, params, prompt, n, kw):
  """`generate` on the request alone (N_REF tokens, truncated: each step's token depends only on
  the earlier ones and the key chain, so one compile per prompt length)."""
  kw = dict(kw)
  rng = jax.random.PRNGKey(kw.pop("seed"))
  sampling = Sampling(temperature=kw.pop("temperature", 0.0), **kw)
  out = generate(model, params, [prompt], max_new_tokens=N_REF, rng=rng, sampling=sampling)
  return out.tokens[0, :n].tolist()


def test_row_sampling_equals_process_logits_row_by_row():
  logits = jax.random.normal(jax.random.PRNGKey(3), (5, 9)) * 2
  seen = jax.random.bernoulli(jax.random.PRNGKey(4), 0.3, (5, 9))
  settings = [
      Sampling(temperature=0.0, repetition_penalty=2.0),
      Sampling(temperature=0.7, top_k=3),
      Sampling(temperature=1.3, top_p=0.6),
      Sampling(temperature=1.0, top_k=4, top_p=0.9, repetition_penalty=1.5),
      Sampling(temperature=0.0),
  ]
  rows = RowSampling.of(settings)
  got = jax.jit(process_logits_rows)(logits, rows, seen)
  keys = jax.random.split(jax.random.PRNGKey(5), 5)
  tokens, logprobs = jax.jit(sample_rows)(keys, logits, rows, seen)
  ref_logits = jax.jit(process_logits, static_argnums=1)
  ref_sample = jax.jit(sample, static_argnums=2)
  for b, s in enumerate(settings):
    want = ref_logits(logits[b : b + 1], s, seen[b : b + 1])
    np.testing.assert_array_equal(got[b : b + 1], want)
    assert int(tokens[b]) == int(ref_sample(keys[b], logits[b : b + 1], s, seen[b : b + 1])[0])
    lp = jax.nn.log_softmax(want[0])[tokens[b]]
    np.testing.assert_allclose(logprobs[b], lp, rtol=1e-6)
  assert float(logprobs[0]) == float(logprobs[4]) == 0.0  # greedy: a one-hot distribution


def test_engine_decodes_the_layer_unrolled_model(dense):
  """`decoding.unroll_layers`: the same logits from per-layer params (in-place caches)."""
  model, params, engine = dense
  assert model.scan_layers and not engine.model.scan_layers
  tokens = jnp.array([[1, 5, 7, 2]])
  want = model.apply({"params": params}, tokens)[0]
  got = engine.model.apply({"params": engine.params}, tokens)[0]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert decoding.unroll_layers(engine.model, engine.params)[0] is engine.model  # a no-op now


@pytest.mark.parametrize("kind", ["dense", "moe_capacity"])
def test_every_request_equals_generate_alone(kind, dense):
  """16 mixed requests through 4 slots (joining and leaving at different steps, several steps
  per call) give each request exactly `generate`'s tokens on it alone, greedy and sampled. With
  capacity-factor MoE too: decoding is dropless, so other slots never take a row's experts."""
  reqs = _requests()
  if kind == "dense":
    model, params, engine = dense
    server = DecodeServer(engine, max_steps_per_call=4)
  else:  # greedy only (fewer compiles): the point is that rows do not share expert capacity
    model, params = _lm(num_experts=4, moe_capacity_factor=1.0)
    engine = Engine(model, params, num_slots=SLOTS, max_len=MAX_LEN, prefill_buckets=(16,))
    server = DecodeServer(engine, max_steps_per_call=2)
    reqs = [(p, n, {"seed": kw["seed"]}) for p, n, kw in reqs]
  engine.reset()
  futures = [server.submit(p, max_new_tokens=n, **kw) for p, n, kw in reqs]
  server.run_until_idle()
  for (prompt, n, kw), fut in zip(reqs, futures):
    done = fut.result()
    assert done.tokens == _alone(model, params, prompt, n, kw), (prompt, n, kw)
    assert done.finish_reason == "length" and done.prompt_tokens == len(prompt)
    assert len(done.logprobs) == n and all(lp <= 0.0 for lp in done.logprobs)
    if "temperature" not in kw:
      assert done.logprobs == [0.0] * n
  assert server.stats["steps"] < sum(n for _, n, _ in reqs)  # slots really were shared
  assert server.stats["prefill_calls"] < server.stats["prefills"] == len(reqs)  # batched
  assert engine.active_slots() == []


def test_prefill_batch_rows_equal_single_prefills_and_insert_many(dense):
  """One batched prefill of mixed lengths and settings gives each row the token and log-prob of
  its own batch-1 prefill; `insert_many` puts rows into slots in one call; decoding then gives
  `generate`'s tokens. Bad batches and slot lists raise naming the problem."""
  model, params, engine = dense
  engine.reset()
  reqs = _requests(3, seed=5)
  reqs[1] = (list(range(1, 14)), reqs[1][1], reqs[1][2])  # 13 tokens: the 24 bucket
  settings = [
      Sampling(
          temperature=kw.get("temperature", 0.0),
          **{k: v for k, v in kw.items() if k in ("top_k", "top_p")},
      )
      for _, _, kw in reqs
  ]
  seeds = [kw["seed"] for _, _, kw in reqs]
  batch = engine.prefill_batch([p for p, _, _ in reqs], settings, seeds)
  assert [p.row for p in batch] == [0, 1, 2] and {p.bucket for p in batch} == {24}
  for prefix, (prompt, _, kw) in zip(batch, reqs):
    alone = engine.prefill(prompt, **kw)
    assert (prefix.token, prefix.length) == (alone.token, len(prompt))
    np.testing.assert_allclose(prefix.logprob, alone.logprob, rtol=1e-5, atol=1e-6)
  slots = [2, 0, 3]
  engine.insert_many(list(zip(batch, slots)))
  assert engine.active_slots() == [0, 2, 3]
  steps = N_REF - 1
  out = engine.generate_steps(steps, capacity=16)
  for prefix, slot, (prompt, _, kw) in zip(batch, slots, reqs):
    assert engine.position(slot) == len(prompt) + steps
    got = [prefix.token] + out.tokens[:, slot].tolist()
    assert got == _alone(model, params, prompt, N_REF, kw)
  engine.reset()
  with pytest.raises(ValueError, match="each slot at most once"):
    engine.insert_many([(batch[0], 1), (batch[1], 1)])
  with pytest.raises(ValueError, match="max_prefill_batch=4 prompts; got 5"):
    engine.prefill_batch([[1]] * 5)
  with pytest.raises(ValueError, match="3 prompts need 3 samplings and seeds"):
    engine.prefill_batch([[1]] * 3, seeds=[0])
  with pytest.raises(ValueError, match="prompt 1"):
    engine.prefill_batch([[1], [V]])
  with pytest.raises(ValueError, match="capacity \\(2\\) must be >= num_steps \\(3\\)"):
    engine.generate_steps(3, capacity=2)


def test_prefilled_requests_wait_for_a_slot_and_can_be_cancelled(dense):
  """A free slot with nothing prefilled prefills the next queued requests together: the ones
  that find no slot wait, prefilled; cancelling one of them resolves it at the next
  iteration, and the others still equal `generate` alone."""
  model, params, engine = dense
  engine.reset()
  server = DecodeServer(engine, max_steps_per_call=4)
  first = [server.submit([1, 2, 3], max_new_tokens=2)]
  first += [server.submit([4, 5, 6, 7], max_new_tokens=N_REF) for _ in range(SLOTS - 1)]
  later = _requests(3, seed=3)
  futures = [server.submit(p, max_new_tokens=n, **kw) for p, n, kw in later]
  assert server.step()  # all slots taken by one prefill; one step ends the first request
  assert first[0].done() and server.stats["prefill_calls"] == 1
  assert server.step()  # one free slot: the 3 later requests are prefilled in one call
  assert server.stats["prefill_calls"] == 2 and server.stats["prefills"] == SLOTS + 3
  assert futures[1].running() and futures[2].running() and len(server._ready) == 2
  assert server.cancel(futures[2])
  assert server.step()
  assert futures[2].result().finish_reason == "cancelled"
  assert len(futures[2].result().tokens) == 1  # its first token, sampled by the prefill
  server.run_until_idle()
  for (prompt, n, kw), fut in zip(later[:2], futures[:2]):
    assert fut.result().tokens == _alone(model, params, prompt, n, kw)
  assert server.stats["prefill_calls"] == 2 and engine.active_slots() == []


def test_stop_tokens_streaming_order_and_no_recompilation(dense):
  model, params, engine = dense
  engine.reset()
  server = DecodeServer(engine, max_steps_per_call=4)
  server.warmup()
  compiles = engine.compile_count
  prompt = [1, 2, 3, 4, 5]
  ref = _alone(model, params, prompt, N_REF, {"seed": 0})
  stop = ref[3]  # its first occurrence ends the request, inside a multi-step call
  first = ref.index(stop)
  seen, threads = [], set()

  def on_token(tok, logp):
    seen.append((tok, logp))
    threads.add(threading.current_thread().name)
    assert not fut.done()  # every callback comes before the future resolves

  fut = server.submit(prompt, max_new_tokens=N_REF, stop_tokens=(stop, V - 1), on_token=on_token)
  others = [server.submit(p, max_new_tokens=n, **kw) for p, n, kw in _requests(6, seed=1)]
  server.run_until_idle()
  done = fut.result()
  assert done.finish_reason == "stop" and done.tokens == ref[: first + 1]
  assert seen == list(zip(done.tokens, done.logprobs))
  assert threads == {threading.current_thread().name}  # run_until_idle: the caller's thread
  assert all(f.result().finish_reason == "length" for f in others)
  assert engine.compile_count == compiles  # every bucket and block size was warmed up


def test_request_and_overflow_errors(dense):
  model, params, engine = dense
  server = DecodeServer(engine)
  cases = [
      (dict(prompt_ids=[]), "prompt_ids"),
      (dict(prompt_ids=[1, V]), "prompt_ids"),
      (dict(prompt_ids=[0.5]), "prompt_ids"),
      (dict(max_new_tokens=0), "max_new_tokens"),
      (dict(prompt_ids=[1] * 20, max_new_tokens=21), "prompt_ids \\+ max_new_tokens"),
      (dict(prompt_ids=[1] * 25), "largest prefill bucket"),
      (dict(temperature=-1.0), "temperature"),
      (dict(temperature=float("nan")), "temperature"),
      (dict(top_k=-2), "top_k"),
      (dict(top_p=0.0), "top_p"),
      (dict(repetition_penalty=0.0), "repetition_penalty"),
      (dict(stop_tokens=(V,)), "stop_tokens"),
      (dict(seed=-1), "seed"),
      (dict(on_token="print"), "on_token"),
  ]
  for overrides, field in cases:
    kw = {"prompt_ids": [1, 2], "max_new_tokens": 4, **overrides}
    with pytest.raises(ValueError, match=field):
      server.submit(kw.pop("prompt_ids"), **kw)
  engine.reset()
  engine.insert(engine.prefill([1] * 20), 0)
  with pytest.raises(ValueError, match="slot 0 is busy"):
    engine.insert(engine.prefill([1]), 0)
  engine.generate_steps(4)
  for _ in range(MAX_LEN - 24):
    engine.generate()
  with pytest.raises(ValueError, match="write past the KV cache \\(max_len 40\\)"):
    engine.generate()  # the slot holds 40 tokens: one more would overflow
  engine.reset()
  from nexus_jax.models.hybrid import HybridLM

  with pytest.raises(ValueError, match="HybridLM"):
    Engine(HybridLM.from_preset("tiny", vocab_size=V), None, max_len=16)
  with pytest.raises(ValueError, match="max_len="):
    Engine(model, params)
  assert default_buckets(100) == (16, 32, 64, 100)


def test_engine_thread_serves_futures_from_other_threads_and_asyncio(dense):
  model, params, engine = dense
  engine.reset()
  reqs = _requests(8, seed=2)
  results = {}
  with DecodeServer(engine, max_steps_per_call=4) as server:
    engine_threads = set()

    def client(i):
      prompt, n, kw = reqs[i]
      cb = lambda tok, logp: engine_threads.add(threading.current_thread().name)
      results[i] = server.submit(prompt, max_new_tokens=n, on_token=cb, **kw).result(timeout=120)

    clients = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs) - 1)]
    for t in clients:
      t.start()

    async def via_asyncio():
      prompt, n, kw = reqs[-1]
      return await asyncio.wrap_future(server.submit(prompt, max_new_tokens=n, **kw))

    results[len(reqs) - 1] = asyncio.run(via_asyncio())
    for t in clients:
      t.join(120)
  assert engine_threads == {"nexus-decode-engine"}
  for i, (prompt, n, kw) in enumerate(reqs):
    assert results[i].tokens == _alone(model, params, prompt, n, kw)


def test_stop_fails_pending_requests_cleanly(dense):
  _, _, engine = dense
  engine.reset()
  server = DecodeServer(engine, max_steps_per_call=1).start(warmup=False)
  first = server.submit([1, 2, 3], max_new_tokens=2)
  assert first.result(timeout=120).finish_reason == "length"
  futures = [server.submit([1, 2, 3], max_new_tokens=30) for _ in range(12)]
  queued = server.submit([4], max_new_tokens=30)
  assert server.cancel(queued) and queued.cancelled()
  server.stop(timeout=120)
  for f in futures:
    assert f.done()
    if f.exception() is not None:
      assert isinstance(f.exception(), ServerStopped)
  assert any(isinstance(f.exception(), ServerStopped) for f in futures)
  assert engine.active_slots() == []
  with pytest.raises(RuntimeError, match="stopped"):
    server.submit([1], max_new_tokens=1)
  drained = DecodeServer(engine).start(warmup=False)
  pending = [drained.submit([5, 6], max_new_tokens=3) for _ in range(6)]
  drained.stop(drain=True, timeout=120)
  assert [len(f.result().tokens) for f in pending] == [3] * 6
