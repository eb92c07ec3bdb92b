"""bench/chat_quality.py's scoring: the rules that decide what counts as right, looping, echoing or varied."""

import pytest

from bench import chat_quality
from conftest import oasst_rows, write_jsonl


def test_an_answer_counts_as_a_whole_word_within_the_first_60_words():
    assert chat_quality.names_an_answer("The capital of France is Paris.", ["paris"])
    assert chat_quality.names_an_answer("It is New  York City", ["new york"])
    assert not chat_quality.names_an_answer("Parisian food is great", ["paris"]), "a whole word, not a prefix"
    late = " ".join(["word"] * 60) + " paris"
    assert not chat_quality.names_an_answer(late, ["paris"]), "the 61st word is too late"


def test_distinct_counts_distinct_ngrams_over_all_replies():
    assert chat_quality.distinct(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert chat_quality.distinct(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert chat_quality.distinct([""], 2) == 0.0


def test_a_loop_is_a_five_word_phrase_said_three_times_within_fifty_words():
    assert chat_quality.in_a_loop("see a walk to the hide. " * 3)
    assert not chat_quality.in_a_loop("see a walk to the hide. " * 2 + "and then home")
    filler = [f"other{i}" for i in range(25)]
    spread = " ".join(["see a walk to the hide", *filler, "see a walk to the hide", *filler, "see a walk to the hide"])
    assert not chat_quality.in_a_loop(spread), "a phrase that recurs across a long answer is not a loop"
    listing = "the capital of France, the capital of Spain, the capital of Italy"
    assert not chat_quality.in_a_loop(listing), "a repeated three-word phrase in a list is not a loop"


def test_an_echo_repeats_the_prompt_and_scores_zero_relevance():
    prompt = "What is the best way to learn to play the guitar?"
    assert chat_quality.is_echo(prompt, "What is the best way to learn to play the guitar? Yes.")
    assert not chat_quality.is_echo(prompt, "Practice a few chords every day with a teacher.")

    class SameVector:  # an embedder under which every text matches every other
        def encode(self, texts, **kwargs):
            import torch
            return torch.ones(len(texts), 2) / 2 ** 0.5

    scores = chat_quality.relevance_scores(SameVector(), [prompt, prompt, prompt],
                                           [prompt, "Practice chords daily.", ""])
    assert scores == pytest.approx([0.0, 1.0, 0.0])


def test_inflected_words_count_as_english():
    word_list = {"cat", "run", "bake", "study", "quick"}
    for word in ("cats", "running", "baked", "studies", "quickly", "run", "2026"):
        assert chat_quality.is_english_word(word, word_list), word
    assert not chat_quality.is_english_word("xqzt", word_list)


def test_the_human_reference_pairs_each_first_question_with_its_best_answer(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl.gz", oasst_rows(5))
    pairs = chat_quality.reference_pairs(path)
    assert len(pairs) == 5 and all(question and answer for question, answer in pairs)
    assert len({answer for _, answer in pairs}) == 5
