"""The teacher-forced exact match must equal real greedy decoding; likelihood picks the best option."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agcl_ds.data.collate import ByteTokenizer, collate
from agcl_ds.data.types import Example, Task
from agcl_ds.evaluation import Evaluator


class Engine:  # the evaluator needs only `.module`
    def __init__(self, module):
        self.module = module


def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(cfg).eval()



def greedy(model, tok, prompt, max_new):
    ids = tok.encode(prompt, prompt=True)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                return tok.decode(out), True
            out.append(nxt)
    return tok.decode(out), False


def test_exact_match_equals_greedy_generation():
    model, tok = tiny(), ByteTokenizer()
    prompts = [f"t{i}:{i * 7919 % 1000:03d}=" for i in range(24)]
    # a little training so that greedy decoding ends in EOS for some prompts, not for others
    batch = collate(tok, [Example(p, p[-4:-1][::-1]) for p in prompts[:16]], 64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    examples, expected = [], []
    for i, prompt in enumerate(prompts):
        text, stopped = greedy(model, tok, prompt, 6)
        if i % 3 == 0 and stopped:  # the model's own greedy answer: exact match
            examples.append(Example(prompt, text))
            expected.append(True)
        elif i % 3 == 1 and stopped and text:  # first tokens right, last one altered
            examples.append(Example(prompt, text[:-1] + chr((ord(text[-1]) + 1) % 128 or 1)))
            expected.append(False)
        else:  # generated text without its EOS, or a different answer
            examples.append(Example(prompt, text + "q" if stopped else text))
            expected.append(False)
    assert sum(expected) >= 3 and expected.count(False) >= 3
    task = Task("t", [], examples)
    ev = Evaluator(Engine(model), tok, max_len=64, batch_size=5, mode="generate")
    assert ev.evaluate(task) == sum(expected) / len(expected)
    for ex, want in zip(examples, expected, strict=True):
        assert ev.evaluate(Task("one", [], [ex])) == float(want)
    # real batched, left-padded greedy decoding scores the same, example by example
    decoded = Evaluator(Engine(model), tok, max_len=64, batch_size=5, mode="generate", max_new_tokens=16,
                        decode="always")
    assert decoded.evaluate(task) == sum(expected) / len(expected)
    answers = decoded.generator.answers([tok.encode(ex.prompt, prompt=True) for ex in examples], 16)
    for ex, answer in zip(examples, answers, strict=True):
        own, stopped = greedy(model, tok, ex.prompt, 16)
        assert answer == own  # the same text as one-at-a-time greedy decoding, EOS cut off
    assert decoded.generator.tokens > 0 and decoded.generator.seconds > 0


def test_generated_answers_are_scored_by_the_tasks_metric():
    model, tok = tiny(), ByteTokenizer()
    prompts = [f"p{i}=" for i in range(6)]
    ev = Evaluator(Engine(model), tok, max_len=64, batch_size=4, mode="generate", max_new_tokens=8)
    answers = ev.generator.answers([tok.encode(p, prompt=True) for p in prompts], 8)
    golds = [a if i % 2 else a + "zz" for i, a in enumerate(answers)]  # half exact, half not
    from agcl_ds.evaluation.metrics import edit_sim

    task = Task("t", [], [Example(p, g) for p, g in zip(prompts, golds, strict=True)], metric="edit_sim")
    want = sum(edit_sim(a, g) for a, g in zip(answers, golds, strict=True)) / len(prompts)
    assert ev.evaluate(task) == pytest.approx(want) and 0 < want < 1


def test_likelihood_picks_the_most_probable_option():
    model, tok = tiny(), ByteTokenizer()
    options = [" alpha", " beta", " gamma"]
    prompts = [f"q{i}?" for i in range(6)]

    def logp(prompt, option):
        ids = tok.encode(prompt, prompt=True) + tok.encode(option, prompt=False) + [tok.eos_id]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
        n = len(tok.encode(prompt, prompt=True))
        return sum(lp[t - 1, ids[t]].item() for t in range(n, len(ids)))

    best = [max(options, key=lambda o, p=p: logp(p, o)) for p in prompts]
    gold = [b if i % 2 == 0 else next(o for o in options if o != b) for i, b in enumerate(best)]
    task = Task("c", [], [Example(p, g) for p, g in zip(prompts, gold, strict=True)], options=options)
    ev = Evaluator(Engine(model), tok, max_len=64, batch_size=4, mode="likelihood")
    assert ev.evaluate(task) == 0.5
