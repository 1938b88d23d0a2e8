"""The serving engine's host side: streamed text, stop strings, prompt scoring, cancellation,
the bounded queue, the loop thread."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

from gpt_jax.data.tokenizers import ByteTokenizer
from gpt_jax.errors import OverloadedError, SamplingError
from gpt_jax.serve.engine import Engine, EngineConfig, Event, Request, Sampling
from gpt_jax.serve.text import TextStream
from test_sample import BASE, full_forward_logits, init_params

TOK = ByteTokenizer()


def stream_all(text: str, stop=()) -> tuple[list[str], TextStream]:
    stream = TextStream(TOK, stop)
    pieces = [stream.add(t) for t in TOK.encode(text)]
    if not stream.stopped:
        pieces.append(stream.finish())
    return pieces, stream


def test_streamed_text_never_splits_a_character():
    text = "héllo ☃ 😀 中文 done"
    pieces, stream = stream_all(text)
    assert "".join(pieces) == text == stream.text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[TOK.encode(text).index(0xF0)] == ""  # the emoji's first byte: held


@pytest.mark.parametrize("text, stop, shown", [
    ("one two\nthree", ["\n"], "one two"),
    ("abc STOP def", ["STOP"], "abc "),
    ("a ST b", ["STOP"], "a ST b"),  # a prefix that does not complete is shown in the end
    ("xx ab", ["abc"], "xx ab"),  # held to the end, then shown
    ("☃stop", ["stop", "☃s"], ""),  # the earliest stop wins
    ("no stop here", ["\n\n", "###"], "no stop here"),
])
def test_stop_strings_are_never_shown(text, stop, shown):
    pieces, stream = stream_all(text, stop)
    assert "".join(pieces) == shown == stream.text
    for s in stop:
        assert s not in "".join(pieces)
    assert stream.stopped == any(s in text for s in stop)


def test_held_text_is_never_shown_before_it_is_known_not_to_be_a_stop():
    stream = TextStream(TOK, ["END"])
    shown = ""
    for ch in "xEN":
        shown += stream.add(ord(ch))
    assert shown == "x"  # "EN" may begin "END"
    shown += stream.add(ord("D"))
    assert shown == "x" and stream.stopped


def engine(**kw) -> Engine:
    return Engine(BASE, init_params(BASE), TOK, EngineConfig(**{"slots": 2, **kw}))


def test_prompt_logprobs_for_echo_equal_the_full_forward_pass():
    prompt = [5, 9, 13, 7, 1, 2]
    (h,) = engine().generate([Request(prompt, 0, Sampling(0.0), logprobs=2, echo=True)])
    assert h.choices[0].tokens == [] and h.choices[0].finish_reason == "length"
    logp = jax.nn.log_softmax(full_forward_logits(BASE, init_params(BASE), [prompt])[0,
                                                                      :, :BASE.vocab_size])
    want = [float(logp[t - 1, prompt[t]]) for t in range(1, len(prompt))]
    assert h.prompt_logprobs[0] is None
    np.testing.assert_allclose(h.prompt_logprobs[1:], want, atol=1e-5)
    for t, top in enumerate(h.prompt_top_logprobs[1:]):
        assert [i for i, _ in top] == list(np.argsort(-np.asarray(logp[t]))[:2])


def test_generate_prefills_several_prompts_in_one_call_as_each_alone():
    """`generate` takes every request that fits (prompts of one bucket prefilled together,
    up to prefill_rows), with an echo-scored prompt, a zero-token request and n=2 among them:
    each gets what it gets alone, and the slots end free."""
    asks = [Request([5, 9, 13], 6, Sampling(0.0)),
            Request([5, 9, 13, 7, 1, 2], 0, Sampling(0.0), logprobs=2, echo=True),
            Request([7, 1, 2, 3], 5, Sampling(0.8, seed=3), n=2),
            Request(list(range(1, 20)), 4, Sampling(0.0)),  # another bucket
            Request([2, 4, 6, 8], 3, Sampling(0.0), logprobs=1, echo=True),
            Request([11, 12], 7, Sampling(1.0, top_k=5, seed=9))]
    together = engine(slots=8, prefill_rows=4).generate(asks)
    for ask, got in zip(asks, together):
        (alone,) = engine(slots=8, prefill_rows=1).generate([ask])
        assert [c.tokens for c in got.choices] == [c.tokens for c in alone.choices]
        for a, b in zip(got.choices, alone.choices):
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-6)
        if ask.echo:
            np.testing.assert_allclose(got.prompt_logprobs[1:], alone.prompt_logprobs[1:],
                                       atol=1e-6)
    assert together[2].choices[0].tokens != together[2].choices[1].tokens


def test_events_stream_each_choice_and_end_it_once():
    events: list[Event] = []
    eng = engine()
    h = eng.submit(Request([1, 2, 3], 6, Sampling(1.0, seed=2), n=2), events.append)
    eng.run_until_idle()
    assert h.done.is_set()
    for index in range(2):
        mine = [e for e in events if e.index == index]
        assert [e.finish_reason for e in mine if e.finish_reason] == ["length"]
        assert mine[-1].finish_reason == "length"
        assert "".join(e.text for e in mine) == h.choices[index].text
        assert sum(len(e.tokens) for e in mine) == len(h.choices[index].tokens) == 6


def test_a_cancelled_request_frees_its_slot_within_one_step():
    eng = engine(slots=1)
    long = eng.submit(Request([1, 2], 25, Sampling(0.0)))
    waiting = eng.submit(Request([3, 4], 3, Sampling(0.0)))
    eng.step()
    eng.step()
    assert eng.slots[0][0] is long
    long.cancel()
    eng.step()  # frees the slot, then admits the waiting request there
    assert long.done.is_set() and long.choices[0].finish_reason == "cancelled"
    assert eng.slots[0][0] is waiting
    eng.run_until_idle()
    assert waiting.choices[0].finish_reason == "length"


def test_a_full_queue_refuses_and_bad_requests_name_the_value():
    eng = engine(slots=1, max_queue=2)
    for _ in range(2):
        eng.submit(Request([1], 4, Sampling(0.0)))
    with pytest.raises(OverloadedError, match="queue is full \\(2 waiting requests\\)"):
        eng.submit(Request([1], 4, Sampling(0.0)))
    with pytest.raises(SamplingError, match="the prompt has 30 tokens and max_tokens=5: 35 "
                                            "exceed the model's context of 32 tokens"):
        eng.check(Request([1] * 30, 5))
    with pytest.raises(SamplingError, match="logprobs=6 must be between 0 and 5"):
        eng.check(Request([1], 1, logprobs=6))
    with pytest.raises(SamplingError, match="n=2 must be between 1 and the engine's 1 slots"):
        eng.check(Request([1], 1, n=2))


def test_the_loop_thread_serves_concurrent_submitters_and_stops():
    eng = engine(slots=2)
    eng.start()
    results = {}

    def client(i: int):
        h = eng.submit(Request([1 + i, 2], 5, Sampling(0.7, seed=i)))
        assert h.wait(60)
        results[i] = h.choices[0].tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    busy = eng.submit(Request([9], 30, Sampling(0.0)))
    time.sleep(0.2)
    eng.stop(deadline_s=0.0)
    assert busy.done.is_set() and busy.choices[0].finish_reason in ("cancelled", "length")
    alone = engine().generate([Request([1 + 3, 2], 5, Sampling(0.7, seed=3))])[0]
    assert sorted(results) == list(range(6)) and results[3] == alone.choices[0].tokens
