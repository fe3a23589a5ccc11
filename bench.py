"""
Benchmarks: speed measured against what users would otherwise run, printed as one table.

    python bench.py              # every benchmark the installed packages allow
    python bench.py simulator    # one of them by name

simulator  one simulated-user turn (analysis + reply) for 32 dialogues against an OpenAI-compatible
           loopback server that answers each call after 200 ms: all dialogues concurrently (ours)
           versus one dialogue after another (the official code's serial loop).
"""

import json
import platform
import statistics
import sys
import tempfile
import time

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


BENCHMARKS = {"simulator": simulator_turn}

if __name__ == "__main__":
    names = sys.argv[1:] or list(BENCHMARKS)
    if unknown := [n for n in names if n not in BENCHMARKS]:
        sys.exit(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.processor() or 'cpu'}; "
          f"{time.strftime('%Y-%m-%d')}")
    for name in names:
        BENCHMARKS[name]()
