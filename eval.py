"""
The Sentient benchmark (SAGE protocol), the five-capability judge, chit-chat, and comparisons.

    python eval.py --model runs/ppo-think/checkpoints/step_000200/policy --mode think \
        --simulator llm --sim-url https://api.deepseek.com/v1 --sim-model deepseek-chat --out evals/ppo-think
    python eval.py --model tiny --scenarios test --out evals/tiny          # offline: tiny model, scripted user
    python eval.py --assistant-url https://api.openai.com/v1 --assistant-model gpt-4o \
        --system-prompt sage --simulator llm ... --out evals/gpt-4o   # any OpenAI-compatible assistant
    python eval.py --chitchat ...                                          # the casual-talk scenarios
    python eval.py ... --judge --judge-url URL --judge-model M             # add the five capabilities
    python eval.py --from-transcripts FILE.jsonl ... --out DIR             # recompute scores from transcripts
    python eval.py --compare evals/a evals/b --paper                       # one table, and emotion per turn
    python eval.py --replay RUN.jsonl --simulator llm ... --out DIR        # our simulator on recorded SAGE turns

Protocol (--protocol sage, each setting a flag of its own): each scenario opens with its first_talk; the
emotion starts at 40; each change is clamped to +-10; the dialogue stops when the emotion reaches 100,
falls below 10, or the simulated user says goodbye; at most 10 assistant replies, of which the first 9
are scored (a 10th, unscored reply follows a 9th that did not end the dialogue).
Sentient score = mean final emotion; success = final >= 100; failure = final < 10.
A run writes OUT/transcripts.jsonl (one dialogue a line, the SAGE schema, appended as each dialogue
ends, so an interrupted run resumes where it stopped) and OUT/summary.json ({run name: summary}).
"""

import argparse
import collections
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

import simulator as S

CAPABILITIES = ("empathic_depth", "core_insight", "solution_crafting", "dialogue_guidance", "style_adaptability")

# Published Sentient and chit-chat scores of the RLVER paper's Table 1 (SAGE, DeepSeek-V3 simulator).
PAPER = {
    "paper: Qwen2.5-7B-Instruct": (13.3, 37.8),
    "paper: PPO direct": (61.7, 53.4),
    "paper: PPO think": (79.2, 62.1),
    "paper: GRPO direct": (68.3, 49.2),
    "paper: GRPO think": (72.0, 53.0),
}

# -----------------------------------------------------------------------------
# Scores from transcripts


def read_jsonl(path, required, what, tolerate_torn_end=False):
    """[(line number, object)] of a JSON Lines file whose objects need the `required` keys. A malformed
    line is an error naming the file and line, except a torn last line when resuming (a run killed
    mid-write), which is dropped."""
    lines = Path(path).read_text(encoding="utf-8-sig").split("\n")   # JSON Lines end at \n only (text may hold U+2028)
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict) or any(key not in item for key in required):
                raise ValueError(f"a {what} needs {' and '.join(repr(k) for k in required)}")
        except ValueError as e:
            if tolerate_torn_end and lineno == len(lines):
                break
            raise ValueError(f"{path} line {lineno}: not a {what} ({e})") from None
        out.append((lineno, item))
    return out


def read_transcripts(path, tolerate_torn_end=False, numbered=False):
    """Dialogues of a transcript file (one JSON object a line, the SAGE schema); with numbered, (line, dialogue)."""
    items = read_jsonl(path, ("emo_point", "history"), "transcript", tolerate_torn_end)
    return items if numbered else [item for _, item in items]


def bootstrap_ci(values, resamples=10000, level=0.95, seed=0):
    """Percentile bootstrap confidence interval of the mean."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    means = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def emotion_by_turn(transcript, turns=9):
    """The emotion at the start and after each scored reply, the last value carried forward: [turns + 1]."""
    points = [h["emotion-point"] for h in transcript["history"] if h["role"] == "user" and "emotion-point" in h]
    points = points or [transcript["emo_point"]]
    return (points + [points[-1]] * turns)[:turns + 1]


UNPARSED_LIMIT = 0.5   # a score whose simulator analyses were mostly unreadable measures the parser, not the policy


def summarize(transcripts):
    """Sentient score (mean final emotion) with its 95% bootstrap interval, successes (>= 100), failures
    (< 10), replies per dialogue, reply length in characters, format violations (think mode), the share of
    the simulator's analyses that stayed unparsable (counted as no change; at 50% or more the score is
    marked not meaningful), the mean emotion per turn, the judge's capabilities when present, and all of
    it by hidden need and character type."""
    emotions = [t["emo_point"] for t in transcripts]
    replies = [h for t in transcripts for h in t["history"] if h["role"] == "assistant"]
    think = [h for h in replies if "format_violation" in h]
    judged = [t["judge"] for t in transcripts if isinstance(t.get("judge"), dict)]
    scored = [j for j in judged if not j.get("failed")]
    counted = [t for t in transcripts if "parse_failures" in t and "turns" in t]   # our transcripts record them
    unparsed = sum(t["parse_failures"] for t in counted) / max(sum(t["turns"] for t in counted), 1) if counted else None
    unreadable = sum(t.get("end_reason") == "unreadable" for t in transcripts)   # ended: the user's message unreadable
    low, high = bootstrap_ci(emotions)
    out = {
        "n": len(transcripts),
        "sentient_score": float(np.mean(emotions)),
        "ci95": [low, high],
        "success": sum(e >= S.SUCCESS_EMOTION for e in emotions),
        "failure": sum(e < S.FAILURE_EMOTION for e in emotions),
        "turns_mean": len(replies) / len(transcripts),
        "reply_chars_mean": float(np.mean([len(h["content"]) for h in replies])) if replies else 0.0,
        "format_violation_rate": sum(h["format_violation"] for h in think) / len(think) if think else None,
        "parse_failure_rate": unparsed,
        "unreadable_dialogues": unreadable,
        "goodbyes": sum(t.get("end_reason") == "goodbye" for t in transcripts),   # ended by the user's own goodbye
        "meaningful": (unparsed is None or unparsed < UNPARSED_LIMIT) and unreadable < UNPARSED_LIMIT * len(transcripts),
        "emotion_by_turn": np.mean([emotion_by_turn(t) for t in transcripts], axis=0).round(2).tolist(),
        "capabilities": {c: float(np.mean([j[c] for j in scored])) for c in CAPABILITIES} if scored else None,
        "judge_failures": len(judged) - len(scored),
    }
    for key, field in (("by_need", lambda t: t.get("need") or t.get("task", "?")), ("by_character", lambda t: t["character"])):
        groups = collections.defaultdict(list)
        for t in transcripts:
            groups[field(t)].append(t["emo_point"])
        out[key] = {g: {"n": len(v), "sentient_score": float(np.mean(v)), "success": sum(e >= 100 for e in v),
                        "failure": sum(e < 10 for e in v)} for g, v in sorted(groups.items())}
    return out


def print_summary(name, s):
    if not s.get("meaningful", True):
        print(f"\n{name}: Sentient not meaningful: {s['parse_failure_rate'] or 0:.0%} of the simulator's analyses "
              f"were unparsable and counted as no change, and {s.get('unreadable_dialogues', 0)} of {s['n']} dialogues "
              f"ended on an unreadable user message (the mean final emotion would read {s['sentient_score']:.1f}); "
              "check that --sim-model follows the prompts")
        return
    print(f"\n{name}: Sentient {s['sentient_score']:.1f} (95% CI {s['ci95'][0]:.1f}-{s['ci95'][1]:.1f}), "
          f"success {s['success']}, failure {s['failure']} of {s['n']}"
          + (f", {s['goodbyes']} left with a goodbye" if s.get("goodbyes") else "") + f"; {s['turns_mean']:.1f} replies of "
          f"{s['reply_chars_mean']:.0f} characters" + (f"; format violations {s['format_violation_rate']:.1%}"
                                                       if s["format_violation_rate"] is not None else "")
          + (f"; unparsable analyses {s['parse_failure_rate']:.1%}" if s.get("parse_failure_rate") else "")
          + (f"; {s['unreadable_dialogues']} ended on an unreadable user message" if s.get("unreadable_dialogues") else ""))
    if s["capabilities"]:
        print("capabilities: " + ", ".join(f"{c} {v:.2f}" for c, v in s["capabilities"].items())
              + (f" ({s['judge_failures']} judge failures)" if s["judge_failures"] else ""))
    for key in ("by_need", "by_character"):
        print(f"\n| {key[3:]:<42} | {'n':>3} | {'score':>5} | {'succ':>4} | {'fail':>4} |")
        print(f"|{'-' * 44}|-----|-------|------|------|")
        for group, g in s[key].items():
            print(f"| {group[:42]:<42} | {g['n']:>3} | {g['sentient_score']:>5.1f} | {g['success']:>4} | {g['failure']:>4} |")


# -----------------------------------------------------------------------------
# The assistant under test: a local model through the trainer's engine, or an OpenAI-compatible endpoint


class LocalAssistant:
    """A local model: each dialogue's thread asks for its reply (`reply(messages)`), and `serve` generates
    for whichever dialogues are waiting, with the trainer's engines (--engine: vLLM or HF generate)."""

    def __init__(self, args, device):
        import engines

        self.model, self.tokenizer, path = engines.load_policy(args.model, device)
        self.engine = engines.make_engine(args.engine, self.model, self.tokenizer, path, temperature=args.temperature,
                                          top_p=args.top_p, seed=args.seed, device=device,
                                          max_model_len=args.max_context_tokens, gpu_memory=args.vllm_gpu_memory)
        self.max_new_tokens, self.seed, self.request_seed = args.max_new_tokens, args.seed, engines.request_seed
        self.encode_chat = engines.encode_chat   # message text as plain text: a user cannot write a control token

    def reply(self, messages, dialogue_id):
        seed = self.request_seed(self.seed, dialogue_id, len(messages))   # the same reply whatever the timing
        out = self.engine.submit(self.encode_chat(self.tokenizer, messages), self.max_new_tokens, seed)
        return self.tokenizer.decode(out.result().ids, skip_special_tokens=True)

    def serve(self, dialogues):
        self.engine.serve(dialogues)


class RemoteAssistant:
    """The same interface over an OpenAI-compatible endpoint: each dialogue's thread calls it directly."""

    def __init__(self, chat):
        self.chat = chat

    def reply(self, messages, dialogue_id):
        return self.chat(messages)

    def serve(self, dialogues):
        wait(dialogues)


def run_benchmark(scenarios, assistant, chat, system_prompt, path, args):
    """Play every scenario not yet in `path` under the SAGE protocol, up to `--batch-size` dialogues at once,
    each at its own pace in its own thread; append each dialogue's transcript as soon as it ends. A dialogue
    whose simulator fails for good is left out of the file (the next run plays it) and reported.
    Returns all transcripts of the file."""
    done = read_transcripts(path, tolerate_torn_end=True) if path.exists() else []
    path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in done), encoding="utf-8")   # drops a torn last line
    finished = {t["dialogue_id"] for t in done}
    todo = [s for s in scenarios if s.id not in finished]
    if done:
        print(f"resuming: {len(done)} dialogues already in {path}, {len(todo)} to go")
    sim = S.Simulator(chat, mode=args.mode, concurrency=args.sim_concurrency, **S.simulator_settings(args))
    bar, lock = tqdm(total=len(todo), desc="dialogues"), threading.Lock()

    def play(scenario, f):   # one dialogue's life: the user opens, then reply and answer until the end
        user = sim.add(scenario.id, scenario)
        user.open()
        conversation = lambda: [{"role": "system", "content": system_prompt}, *user.history]  # noqa: E731
        while not user.done:
            user.respond(assistant.reply(conversation(), scenario.id))
        if user.end_reason == "turn_cap" and args.final_reply:   # the 10th reply, unscored
            user.add_final_reply(assistant.reply(conversation(), scenario.id))
        with lock:
            f.write(json.dumps(sim.transcript(scenario.id), ensure_ascii=False) + "\n")
            f.flush()
            bar.update()

    with open(path, "a", encoding="utf-8") as f, ThreadPoolExecutor(max(1, min(args.batch_size, len(todo)))) as pool:
        dialogues = [pool.submit(play, s, f) for s in todo]
        assistant.serve(dialogues)
    bar.close()
    sim.close()
    errors = [d.exception() for d in dialogues if d.exception() is not None]
    if unexpected := [e for e in errors if not isinstance(e, S.SimulatorError)]:
        raise unexpected[0]
    if errors:
        print(f"{len(errors)} of {len(todo)} dialogues lost their simulator and are not in {path} (run the same "
              f"command again to play them); last error: {errors[-1]}")
        if len(errors) == len(todo):
            raise errors[-1]
    return read_transcripts(path)


# -----------------------------------------------------------------------------
# Replay calibration: our analysis step on the replies of recorded dialogues


def replay_turns(transcript, where):
    """The scored turns of one recorded dialogue: for each assistant reply that a user message with an
    emotion followed, (turn index, the visible history up to that reply, the emotion before it, the recorded
    change = the emotion after it minus the emotion before, as the recording's simulator applied it)."""
    history, turns, emotion, index = [], [], None, 0
    for k, entry in enumerate(transcript.get("history") or []):
        if not isinstance(entry, dict) or entry.get("role") not in ("user", "assistant"):
            raise ValueError(f"{where}: history entry {k} is not a user or assistant message")
        history.append({"role": entry["role"], "content": str(entry.get("content") or "")})
        if entry["role"] == "user" and isinstance(entry.get("emotion-point"), (int, float)):
            point = int(entry["emotion-point"])
            if emotion is not None and len(history) >= 3 and history[-2]["role"] == "assistant":
                turns.append((index, history[:-1], emotion, point - emotion))
                index += 1
            emotion = point
    return turns


def replay(files, chat, out, args):
    """Score every recorded reply of `files` (the SAGE transcript schema) with our analysis step, in its
    recorded context and from its recorded emotion, and compare with the recorded change. Turns are
    scored concurrently and appended to OUT/replay_turns.jsonl as they finish, so an interrupted replay
    resumes where it stopped; OUT/replay.json holds the figures per file (replay_figures)."""
    settings = S.protocol_settings(args)
    path = out / "replay_turns.jsonl"
    keys = ("file", "line", "turn", "ours")
    done = [r for _, r in read_jsonl(path, keys, "replayed turn", tolerate_torn_end=True)] if path.exists() else []
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done), encoding="utf-8")   # drops a torn last line
    finished = {(r["file"], r["line"], r["turn"]) for r in done}
    jobs, dialogues = [], {}
    for file in files:
        base = os.path.basename(file)
        for lineno, transcript in read_transcripts(file, numbered=True)[:args.limit]:
            where = f"{file} line {lineno}"
            scenario = S.transcript_scenario(transcript, where)
            turns = replay_turns(transcript, where)
            dialogues[(base, lineno)] = (transcript, turns)
            jobs += [(base, lineno, scenario, turn) for turn in turns if (base, lineno, turn[0]) not in finished]
    if done:
        print(f"resuming: {len(done)} turns already in {path}, {len(jobs)} to go")
    bar, lock = tqdm(total=len(jobs), desc="replayed turns"), threading.Lock()

    def score(job, f):
        base, lineno, scenario, (turn, history, emotion, recorded) = job
        said = [m["content"] for m in history if m["role"] == "assistant"]
        prompt = S.analysis_prompt(scenario, history, emotion, args.prompts, args.difficulty)
        analysis, raw, failed = S.ask(chat, [{"role": "user", "content": prompt}],
                                      lambda text: S.parse_analysis(text, said), retries=2)
        ours = None if failed else S.apply_change(emotion, analysis["change"], settings["max_change"])[0]
        record = {"file": base, "line": lineno, "id": str(dialogues[(base, lineno)][0].get("id")), "turn": turn,
                  "emotion_before": emotion, "recorded": recorded, "ours": ours, "parse_failed": failed}
        with lock:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            bar.update()

    with open(path, "a", encoding="utf-8") as f, ThreadPoolExecutor(max(1, min(args.sim_concurrency, len(jobs)))) as pool:
        futures = [pool.submit(score, job, f) for job in jobs]
    bar.close()
    errors = [e for e in (x.exception() for x in futures) if e is not None]
    if unexpected := [e for e in errors if not isinstance(e, S.SimulatorError)]:
        raise unexpected[0]
    if errors:
        print(f"{len(errors)} of {len(jobs)} turns lost their simulator and are not in {path} (run the same command "
              f"again to score them); last error: {errors[-1]}")
    figures = replay_figures([r for _, r in read_jsonl(path, keys, "replayed turn")], dialogues, settings)
    (out / "replay.json").write_text(json.dumps(figures, indent=1, ensure_ascii=False), encoding="utf-8")
    return figures


def replay_figures(records, dialogues, settings):
    """{file base name: figures} from the replayed turns. Per turn, over the turns our analysis could
    read: sign agreement (both up, both down, or both 0), the mean absolute error and Pearson's
    correlation between our change and the recorded one. Per dialogue: the final emotion re-accumulated
    from the recorded start with our changes (clamped and bounded as the protocol says; an unreadable
    analysis counts 0, as in a live dialogue, and no early end), next to the recorded final emotion."""
    by_turn = {(r["file"], r["line"], r["turn"]): r for r in records}
    figures = {}
    for base in dict.fromkeys(b for b, _ in dialogues):
        rows = [r for (b, _, _), r in sorted(by_turn.items()) if b == base]
        read = [r for r in rows if r["ours"] is not None]
        ours, recorded = np.array([r["ours"] for r in read], float), np.array([r["recorded"] for r in read], float)
        per_dialogue = []
        for (b, lineno), (transcript, turns) in dialogues.items():
            if b != base or not turns or any((b, lineno, t[0]) not in by_turn for t in turns):
                continue   # not fully replayed yet
            emotion = turns[0][2]
            for turn in turns:   # an unreadable analysis counts 0
                _, emotion = S.apply_change(emotion, by_turn[(b, lineno, turn[0])]["ours"] or 0, None, settings["min_emotion"])
            per_dialogue.append({"line": lineno, "id": str(transcript.get("id")), "turns": len(turns),
                                 "recorded_final": transcript.get("emo_point"), "replayed_final": emotion})
        finals = [(d["recorded_final"], d["replayed_final"]) for d in per_dialogue if isinstance(d["recorded_final"], (int, float))]
        figures[base] = {
            "turns": len(rows), "parse_failures": len(rows) - len(read),
            "sign_agreement": float(np.mean(np.sign(ours) == np.sign(recorded))) if read else None,
            "mae": float(np.mean(np.abs(ours - recorded))) if read else None,
            "correlation": correlation(ours, recorded),
            "mean_change": {"ours": float(ours.mean()) if read else None, "recorded": float(recorded.mean()) if read else None},
            "dialogues": len(per_dialogue),
            "final_mae": float(np.mean([abs(a - b) for a, b in finals])) if finals else None,
            "final_correlation": correlation(*map(np.array, zip(*finals))) if finals else None,
            "final_mean": {"ours": float(np.mean([b for _, b in finals])) if finals else None,
                           "recorded": float(np.mean([a for a, _ in finals])) if finals else None},
            "per_dialogue": per_dialogue,
        }
    return figures


def correlation(a, b):
    """Pearson's r, or None when either side does not vary (or has fewer than two values)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def print_replay(figures):
    for base, f in figures.items():
        show = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
        print(f"{base}: {f['turns']} turns ({f['parse_failures']} unreadable), sign agreement "
              f"{show(f['sign_agreement'], '.1%')}, MAE {show(f['mae'], '.2f')}, r {show(f['correlation'], '.2f')}; "
              f"mean change ours {show(f['mean_change']['ours'], '+.2f')} vs recorded {show(f['mean_change']['recorded'], '+.2f')}; "
              f"{f['dialogues']} dialogues: final emotion MAE {show(f['final_mae'], '.1f')}, r {show(f['final_correlation'], '.2f')}, "
              f"mean ours {show(f['final_mean']['ours'], '.1f')} vs recorded {show(f['final_mean']['recorded'], '.1f')}")


# -----------------------------------------------------------------------------
# The five-capability judge


def parse_judgement(text, assistant_texts=()):
    """The judge's five scores, whole numbers from 1 to 5, from its last JSON object with all five that is
    not quoted from the assistant's replies (`assistant_texts`)."""
    found = S.last_json_object(text, CAPABILITIES, exclude=assistant_texts)
    scores = {c: S.as_int(found[c], c) for c in CAPABILITIES}
    if bad := [c for c, v in scores.items() if not 1 <= v <= 5]:
        raise S.ParseError(f"'{bad[0]}' must be from 1 to 5, got {scores[bad[0]]}")
    return {**scores, "reason": str(found.get("reason", ""))}


def judge(chat, transcript, retries=2):
    """Scores for one dialogue, or {'failed': True, 'error': ...} after the retries: never invented."""
    history = [{"role": h["role"], "content": h["content"]} for h in transcript["history"]]
    prompt = S.render("judge", persona=S.quote(transcript["player"]), scene=S.quote(transcript["scene"]),
                      hidden_need=S.quote(transcript["task"]), history=S.format_history(history, "Person", "Partner"))
    messages, error = [{"role": "user", "content": prompt}], ""
    for _ in range(retries + 1):
        try:
            raw = chat(messages)
            return parse_judgement(raw, [h["content"] for h in history if h["role"] == "assistant"])
        except S.ParseError as e:
            error = str(e)
            messages = messages[:1] + [{"role": "assistant", "content": raw}, {"role": "user", "content":
                       f"That answer could not be read ({e}). Answer again with only the JSON object asked for."}]
        except S.SimulatorError as e:   # the endpoint is down after its own retries: report, do not invent
            return {"failed": True, "error": str(e)}
    return {"failed": True, "error": error}


def run_judge(transcripts, chat, path, concurrency=32):
    """Judge every dialogue that has no judgement yet, concurrently; rewrite the file atomically."""
    todo = [t for t in transcripts if "judge" not in t]
    with ThreadPoolExecutor(concurrency) as pool:
        for t, verdict in zip(todo, tqdm(pool.map(lambda t: judge(chat, t), todo), total=len(todo), desc="judge")):
            t["judge"] = verdict
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in transcripts), encoding="utf-8")
    os.replace(tmp, path)
    return transcripts


# -----------------------------------------------------------------------------
# Comparing runs


def compare(summaries, paper=False):
    """One markdown table of several runs ({name: summary}), optionally with the paper's published rows."""
    cap_names = [c.split("_")[0] for c in CAPABILITIES]
    lines = ["| run | n | Sentient (95% CI) | success | failure | " + " | ".join(cap_names) + " |",
             "|---|---|---|---|---|" + "---|" * len(CAPABILITIES)]
    for name, s in summaries.items():
        caps = [f"{s['capabilities'][c]:.2f}" if s.get("capabilities") else "" for c in CAPABILITIES]
        score = (f"{s['sentient_score']:.1f} ({s['ci95'][0]:.1f}-{s['ci95'][1]:.1f})" if s.get("meaningful", True)
                 else f"not meaningful ({s['parse_failure_rate'] or 0:.0%} unparsed)")
        lines.append(f"| {name} | {s['n']} | {score} | "
                     f"{s['success']} | {s['failure']} | " + " | ".join(caps) + " |")
    if paper:
        for name, (sentient, chitchat) in PAPER.items():
            lines.append(f"| {name} (chit-chat {chitchat}) | 100 | {sentient:.1f} | | | " + " | " * (len(CAPABILITIES) - 1) + " |")
    return "\n".join(lines)


def plot_emotion(summaries, out):
    """Mean emotion per turn for each run: a PNG with matplotlib, else a text table (returned)."""
    turns = max(len(s["emotion_by_turn"]) for s in summaries.values())
    text = ["| run | " + " | ".join(f"t{i}" for i in range(turns)) + " |", "|---|" + "---|" * turns]
    text += [f"| {name} | " + " | ".join(f"{e:.1f}" for e in s["emotion_by_turn"]) + " |" for name, s in summaries.items()]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "\n".join(text)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in summaries.items():
        ax.plot(range(len(s["emotion_by_turn"])), s["emotion_by_turn"], marker="o", label=name)
    ax.set(xlabel="assistant replies scored", ylabel="mean emotion", ylim=(0, 100), title="Emotion per turn")
    ax.axhline(S.FAILURE_EMOTION, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "emotion_by_turn.png", dpi=120)
    return "\n".join(text) + f"\n(plot: {Path(out) / 'emotion_by_turn.png'})"


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to do (default: run the benchmark)")
    g.add_argument("--from-transcripts", nargs="+", metavar="FILE", help="recompute scores from transcript files")
    g.add_argument("--compare", nargs="+", metavar="DIR", help="one table of several evaluation folders")
    g.add_argument("--replay", nargs="+", metavar="FILE",
                   help="score the replies of recorded dialogues (SAGE schema) with our simulator's analysis step "
                        "and compare with the recorded changes: OUT/replay.json")
    g.add_argument("--paper", action="store_true", help="with --compare: add the paper's published rows")
    g.add_argument("--out", default="eval_out", help="transcripts.jsonl, summary.json (and the plot) go here")
    g.add_argument("--name", help="the run's name in summary.json (default: the model's name and the scenarios)")
    g = p.add_argument_group("scenarios")
    g.add_argument("--scenarios", default="test",
                   help="'test' or 'chitchat' (of scenarios.json), or a file (ours or the official SAGE profiles)")
    g.add_argument("--chitchat", action="store_true", help="the chit-chat scenarios (same as --scenarios chitchat)")
    g.add_argument("--limit", type=int, help="only the first N scenarios (with --replay: dialogues of each file)")
    g = p.add_argument_group("assistant under test")
    g.add_argument("--model", help="local model: a path, a Hugging Face id, a .gguf file or 'tiny'")
    g.add_argument("--assistant-url", help="or an OpenAI-compatible endpoint for the assistant")
    g.add_argument("--assistant-model", help="model name at --assistant-url")
    g.add_argument("--assistant-api-key-env", default="OPENAI_API_KEY", help="environment variable holding its key")
    g.add_argument("--mode", choices=S.MODES, default="direct", help="think: the policy's think-then-say format")
    g.add_argument("--system-prompt", choices=("policy", "sage"), default="policy",
                   help="policy: the training prompt of --mode; sage: the benchmark's high-EQ chat partner prompt")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per reply at most (local model)")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--batch-size", type=int, default=100, help="dialogues played at once, each at its own pace")
    g.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="local model: vllm, HF generate, or auto (vllm on GPU when installed)")
    g.add_argument("--max-context-tokens", type=int, default=16384, help="vLLM's context length (local model)")
    g.add_argument("--vllm-gpu-memory", type=float, default=0.85, help="share of the GPU's memory vLLM may take")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--seed", type=int, default=0, help="seeds local sampling")
    g = p.add_argument_group("benchmark")
    g.add_argument("--final-reply", action=argparse.BooleanOptionalAction, default=True,
                   help="one more, unscored reply after the last scored one (SAGE: 10 replies, 9 scored)")
    S.add_args(p, "sage")   # the simulator, and the protocol: SAGE's unless told otherwise
    g = p.add_argument_group("judge")
    g.add_argument("--judge", action="store_true", help="score the five capabilities with an LLM judge")
    g.add_argument("--judge-url", help="OpenAI-compatible endpoint of the judge")
    g.add_argument("--judge-model", help="model name at --judge-url")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding its key")
    return p


def args_problem(args):
    """The first flag or path of a benchmark run that cannot work, in words naming it, or None: found
    before any model loads or any dialogue is played."""
    if bool(args.model) == bool(args.assistant_url):
        return "give the assistant under test: --model, or --assistant-url with --assistant-model"
    for name, allowed, what in (("max_new_tokens", lambda v: v >= 1, "at least 1"), ("batch_size", lambda v: v >= 1, "at least 1"),
                                ("limit", lambda v: v is None or v >= 1, "at least 1"),
                                ("temperature", lambda v: 0 <= v < float("inf"), "0 (greedy) or more"),
                                ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
                                ("max_context_tokens", lambda v: v > args.max_new_tokens, "more than --max-new-tokens")):
        if not allowed(getattr(args, name)):   # `not` so that NaN is refused too
            return f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}"
    if args.assistant_url and (problem := S.url_problem("--assistant-url", args.assistant_url)):
        return problem
    if args.assistant_url and not args.assistant_model:
        return "--assistant-url needs --assistant-model"
    if args.judge and not (args.judge_url and args.judge_model):
        return "--judge needs --judge-url and --judge-model"
    if args.judge and (problem := S.url_problem("--judge-url", args.judge_url)):
        return problem
    if args.model:
        import engines
        if problem := engines.model_problem(args.model):
            return problem
    which = "chitchat" if args.chitchat else args.scenarios
    if which not in ("test", "chitchat") and not Path(which).is_file():
        return f"--scenarios {which}: no such file (or 'test', 'chitchat')"
    return S.sim_args_problem(args)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, files in (("--from-transcripts", args.from_transcripts), ("--replay", args.replay)):
        if files and (missing := [f for f in files if not Path(f).is_file()]):
            parser.error(f"{flag} {missing[0]}: no such file")
    if args.replay and (problem := S.sim_args_problem(args)):
        parser.error(problem)
    if not (args.from_transcripts or args.compare or args.replay) and (problem := args_problem(args)):
        parser.error(problem)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replay:
        figures = replay(args.replay, S.chat_from_args(args), out, args)
        print_replay(figures)
        print(f"\nwrote {out / 'replay.json'}")
        return figures
    if args.from_transcripts:
        summaries = {os.path.basename(f): summarize(read_transcripts(f)) for f in args.from_transcripts}
    elif args.compare:
        summaries = {}
        for d in args.compare:
            summaries.update(json.loads((Path(d) / "summary.json").read_text(encoding="utf-8")))
        print(compare(summaries, args.paper))
        print("\nmean emotion per turn:\n" + plot_emotion(summaries, out))
        return summaries
    else:
        which = "chitchat" if args.chitchat else args.scenarios
        if which in ("test", "chitchat"):
            scenarios = S.load_scenarios(split="test", kind="support" if which == "test" else "chitchat")
        else:
            scenarios = [s for s in S.load_scenarios(which) if s.first_talk]
        scenarios = scenarios[:args.limit]
        if args.model:
            import torch
            torch.manual_seed(args.seed)
            device = "cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device
            assistant = LocalAssistant(args, device)
        else:
            assistant = RemoteAssistant(S.make_chat("llm", args.assistant_url, args.assistant_model, args.assistant_api_key_env,
                                                    args.temperature, args.sim_timeout, args.sim_retries,
                                                    concurrency=args.batch_size, max_tokens=args.max_new_tokens))
        system_prompt = S.load_prompt("sage_partner" if args.system_prompt == "sage" else f"policy_{args.mode}")
        path = out / "transcripts.jsonl"
        transcripts = run_benchmark(scenarios, assistant, S.chat_from_args(args), system_prompt, path, args)
        if args.judge:
            judge_chat = S.make_chat("llm", args.judge_url, args.judge_model, args.judge_api_key_env, 0.0,
                                     args.sim_timeout, args.sim_retries)
            transcripts = run_judge(transcripts, judge_chat, path)
        name = args.name or f"{Path(args.model or args.assistant_model).name}-{Path(which).stem}"
        summaries = {name: summarize(transcripts)}
    for name, s in summaries.items():
        print_summary(name, s)
    (out / "summary.json").write_text(json.dumps(summaries, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"\nwrote {out / 'summary.json'}")
    return summaries


if __name__ == "__main__":
    main()
