"""
Benchmarks: speed measured against what users would otherwise run, printed as one table.

    python bench.py              # every benchmark the installed packages allow
    python bench.py simulator    # one of them by name

simulator  one simulated-user turn (analysis + reply) for 32 dialogues against an OpenAI-compatible
           loopback server that answers each call after 200 ms: all dialogues concurrently (ours)
           versus one dialogue after another (the official code's serial loop).
gpu        on one GPU (skipped without): 3 PPO steps of a random Qwen2.5-0.5B-shaped model under a
           1-rank torchrun; rollout and update tokens/s, peak memory, update MFU. Under 8 minutes.
"""

import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

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
    server = S.serve(S.ScriptedUser(), delay=delay)
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


PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}  # dense, per GPU


def gpu_check(steps=3, out="/tmp/rlver-gpu-check"):
    """On one GPU: 1-rank torchrun, a random model with Qwen2.5-0.5B's shape (the tiny tokenizer), the
    engine vLLM gives when installed (else HF generate), 3 PPO steps against the scripted user. Prints
    rollout and update tokens/s, peak memory and the update's model-FLOPs utilisation (bf16 peak)."""
    import subprocess

    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    import rlver

    if not torch.cuda.is_available():
        print("\ngpu: no GPU here, skipped")
        return
    path = Path(rlver.resolve_model("tiny")).with_name("qwen2.5-0.5b-shape")
    if not path.exists():
        tokenizer = AutoTokenizer.from_pretrained(rlver.resolve_model("tiny"))
        config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                             rope_theta=1e6, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
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


BENCHMARKS = {"simulator": simulator_turn, "gpu": gpu_check}

if __name__ == "__main__":
    names = sys.argv[1:] or list(BENCHMARKS)
    if unknown := [n for n in names if n not in BENCHMARKS]:
        sys.exit(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.processor() or 'cpu'}; "
          f"{time.strftime('%Y-%m-%d')}")
    for name in names:
        BENCHMARKS[name]()
