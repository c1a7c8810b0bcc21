"""Per-answer metrics: SARI against the reference implementation's published values, TRACE's option
extraction and literal handling, and the score-matrix conventions."""

from collections import Counter

import pytest

from agcl_ds.config import METRIC_NAMES
from agcl_ds.evaluation.metrics import METRICS, choice, edit_sim, f1, option_letter, restore_literals, rouge_l
from agcl_ds.evaluation.sari import deletion_score, keep_score, sari, sari_tokens, tokenize_13a
from agcl_ds.metrics import bwt, general_delta

SOURCE = "About 95 species are currently accepted .".split()
REFS = [r.split() for r in ("About 95 species are currently known .", "About 95 species are now accepted .",
                            "95 species are now accepted .")]


@pytest.mark.parametrize("output, expected", [  # tensor2tensor's sari_hook_test (the SARI paper's cases)
    ("About 95 you now get in .", 0.2695360),
    ("About 95 species are now agreed .", 0.6170966),
    ("About 95 species are currently agreed .", 0.5088682),
])
def test_sari_matches_the_papers_cases(output, expected):
    assert sari_tokens(SOURCE, output.split(), REFS)[0] == pytest.approx(expected, abs=5e-8)


def test_sari_edge_cases_of_the_reference_tests():
    assert sari_tokens([3, 1, 4, 1, 5, 9, 2, 6, 5], [3, 1, 4, 1, 5, 9, 2, 6, 5], [[3, 1, 4, 1, 5, 9, 2, 6, 5]])[0] == 1
    assert sari_tokens([3, 1, 4, 1, 5, 9, 2, 6, 5], [3, 1, 4, 1, 80, 70], [[3, 1, 4, 1, 80, 70]])[0] == 1
    assert sari_tokens([3, 1, 4], [3, 3, 1, 1, 1, 4], [[3, 3, 3, 1, 1, 4, 4]], max_order=1)[0] == 1
    assert keep_score(Counter({1: 1, 2: 1}), Counter({2: 1}), Counter({1: 1, 2: 0.5})) == pytest.approx(6 / 15)
    src, out, ref = Counter({1: 1, 2: 1}), Counter({1: 1, 2: 1}), Counter({1: 1})
    assert deletion_score(src, out, ref, beta=1) == 0 and deletion_score(src, out, ref, beta=0) == 1


def test_sari_on_text_equals_evaluate_metric_card():
    """`evaluate`'s "sari" card (what TRACE calls): 26.953601953601954 on 0..100, with its components."""
    refs = ["About 95 species are currently known.", "About 95 species are now accepted.",
            "95 species are now accepted."]
    got = sari("About 95 species are currently accepted.", "About 95 you now get in.", refs)
    assert 100 * got == pytest.approx(26.953601953601954, abs=1e-9)
    s, keep, delete, add = sari_tokens(*(tokenize_13a(t) for t in ("About 95 species are currently accepted.",
                                                                   "About 95 you now get in.")),
                                       [tokenize_13a(r) for r in refs])
    assert (100 * keep, 100 * delete, 100 * add) == pytest.approx((22.527472527472526, 50.0, 8.333333333333332))
    assert sari("About 95 species are currently accepted .", "About 95 species are currently accepted .",
                ["About 95 species are currently accepted ."]) == 1.0


def test_13a_tokenizer_splits_punctuation_not_numbers():
    assert tokenize_13a("Hello, World! It costs 3.50 (net).") == ["hello", ",", "world", "!", "it", "costs", "3.50",
                                                                  "(", "net", ")", "."]


def test_option_letter_as_trace_reads_it():
    assert option_letter(" B. oppose") == "B"  # C-STANCE / FOMC: the first character
    assert option_letter("Because water flows. Answer: b") == "B"  # ScienceQA: after "Answer: "
    assert option_letter("") == ""
    assert choice(" A", "A") == 1.0 and choice("B", "A") == 0.0 and choice("", "") == 0.0
    assert choice("It flows. Answer: B and more", "Because water flows. Answer: B") == 1.0


def test_edit_similarity_restores_py150_literals():
    assert restore_literals('print ( <STR_LIT:hello> , <NUM_LIT> , <STR_LIT> )') == 'print ( hello , 0 ,  )'
    assert edit_sim("print ( hello , name )", "print ( <STR_LIT:hello> , name )") == 1.0
    assert edit_sim("abcd", "abce") == pytest.approx(0.75)  # rapidfuzz ratio: 2 * 3 matches / 8 characters
    assert edit_sim("", "abc") == 0.0


def test_rouge_l_and_token_f1():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat on mat", "the cat sat on the mat") == pytest.approx(0.8)  # P 1, R 4/6
    assert rouge_l("", "gold") == 0.0
    assert f1("The Eiffel Tower!", "eiffel tower") == 1.0  # SQuAD: case, punctuation and articles dropped
    assert f1("Paris in France", "Paris") == pytest.approx(0.5)  # P 1/3, R 1


def test_every_configurable_metric_is_implemented():
    assert set(METRICS) == set(METRIC_NAMES)


def test_bwt_divisor_and_general_delta():
    m = [[0.8, 0.1, 0.0], [0.6, 0.9, 0.0], [0.5, 0.6, 0.7]]
    assert bwt(m) == pytest.approx(((0.5 - 0.8) + (0.6 - 0.9)) / 2)
    assert bwt(m, "T") == pytest.approx(((0.5 - 0.8) + (0.6 - 0.9)) / 3)
    assert general_delta([[0.4, 0.5], [0.3, 0.2]], [0.5, 0.5]) == pytest.approx(-0.25)
    assert general_delta([], []) is None
