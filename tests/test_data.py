"""From source records to conversations: OASST trees, the other formats, cleaning and the split."""

import json

import pytest

from data import (conversations_from_sources, decontaminate, load_or_build_texts, make_conversation,
                  oasst_conversations, parse_langs, read_source, read_texts_file, records_to_conversations,
                  split_by_group)
from runtime import UserError
import newgpt
from conftest import arithmetic_tree, oasst_rows, write_jsonl


def all_contents(conversations):
    return {t["content"] for c in conversations for t in c["turns"]}


def test_best_branch_follows_rank_zero_through_the_tree():
    conversations = list(oasst_conversations(arithmetic_tree(3), {"en"}, "best"))
    assert len(conversations) == 1, "best branch gives one path per tree"
    turns = conversations[0]["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[1]["content"] == "three plus zero is 3.", "the rank-0 reply is followed"
    assert conversations[0]["group"] == "tree3"


def test_all_branches_gives_every_root_to_leaf_path():
    conversations = list(oasst_conversations(arithmetic_tree(3), {"en"}, "all"))
    assert len(conversations) == 2, "two leaves: the follow-up answer and the rank-1 reply"
    assert sorted(len(c["turns"]) for c in conversations) == [2, 4]


def test_deleted_failed_review_and_other_languages_are_dropped_with_their_subtrees():
    contents = all_contents(oasst_conversations(oasst_rows(2), {"en"}, "all"))
    for text in ["A deleted question?", "An answer to a deleted question.", "An answer below a failed review.",
                 "Wie spät ist es?"]:
        assert text not in contents, f"{text!r} should have been filtered out"
    german = oasst_conversations(oasst_rows(2), {"de"}, "all")
    assert all_contents(german) == {"Wie spät ist es?", "Es ist drei Uhr."}
    everything = all_contents(oasst_conversations(oasst_rows(2), None, "all"))
    assert "Es ist drei Uhr." in everything and "A deleted question?" not in everything


def test_unanswered_last_question_is_trimmed():
    rows = arithmetic_tree(1)[:4]  # the follow-up question has no answer
    (conversation,) = oasst_conversations(rows, {"en"}, "best")
    assert conversation["turns"][-1]["role"] == "assistant"


def test_nested_trees_give_the_same_conversations_as_the_message_table():
    rows = arithmetic_tree(5)

    def nest(m):
        replies = [nest(r) for r in rows if r["parent_id"] == m["message_id"]]
        return {k: v for k, v in m.items() if k not in ("parent_id", "message_tree_id")} | {"replies": replies}

    tree = {"message_tree_id": "tree5", "tree_state": "ready_for_export", "prompt": nest(rows[0])}
    from_table = records_to_conversations(rows, "table", {"en"}, "all")
    from_tree = records_to_conversations([tree], "trees", {"en"}, "all")
    assert sorted(map(json.dumps, from_table)) == sorted(map(json.dumps, from_tree))


def test_text_formats_are_parsed_into_turns_and_plain_text_gets_no_roles():
    records = [
        {"text": "<s>[INST] <<SYS>>Be brief.<</SYS>> Hi there [/INST] Hello! </s><s>[INST] Bye [/INST] Bye now. </s>"},
        {"text": "### Human: What is two plus two?### Assistant: Four.### Human: Sure?### Assistant: Yes."},
        {"text": "Just a document.\r\n\r\n\r\n\r\nWith   a second paragraph.   "},
    ]
    llama, guanaco, plain = records_to_conversations(records, "texts", {"en"}, "best")
    assert [(t["role"], t["content"]) for t in llama["turns"]] == [
        ("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye now.")]
    assert [t["role"] for t in guanaco["turns"]] == ["user", "assistant", "user", "assistant"]
    assert guanaco["turns"][1]["content"] == "Four."
    assert plain["turns"] == [{"role": "text", "content": "Just a document.\n\nWith   a second paragraph."}], \
        "plain text keeps its words, loses only extra blank lines and trailing spaces, and gets no roles"


def test_instruction_records_become_one_exchange_with_their_context_as_a_context_turn():
    records = [{"instruction": "Summarise this.", "context": "A long text.", "response": "Short."},
               {"instruction": "Name a colour.", "context": "", "response": "Blue."}]
    with_context, without = records_to_conversations(records, "dolly", {"en"}, "best")
    assert with_context["turns"] == [{"role": "user", "content": "Summarise this."},
                                     {"role": "context", "content": "A long text."},
                                     {"role": "assistant", "content": "Short."}]
    assert without["turns"][0]["content"] == "Name a colour."


def test_unknown_record_shape_is_a_user_error():
    with pytest.raises(UserError, match="unrecognised record shape"):
        records_to_conversations([{"question": "x"}], "odd.jsonl", {"en"}, "best")


def test_exact_duplicates_are_removed(tmp_path):
    rows = [{"text": "same words"}, {"text": "same  words"}, {"text": "same words\n"}]
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    conversations = conversations_from_sources([str(path)], "train", {"en"}, "best")
    assert len(conversations) == 2, "whitespace-normalised exact duplicates collapse; other spacing stays"


def test_max_samples_reads_only_the_first_records(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i}"} for i in range(50)])
    conversations = conversations_from_sources([str(path)], "train", {"en"}, "best", max_samples=20)
    assert [c["turns"][0]["content"] for c in conversations] == [f"document {i}" for i in range(20)]


def test_split_keeps_each_tree_on_one_side_and_is_deterministic():
    conversations = list(oasst_conversations(
        [r for i in range(300) for r in arithmetic_tree(i)], {"en"}, "all"))
    train, val = split_by_group(conversations)
    train_groups, val_groups = {c["group"] for c in train}, {c["group"] for c in val}
    assert val_groups and not train_groups & val_groups, "no tree may appear on both sides"
    assert 0.005 < len(val_groups) / 300 < 0.06, "about 2% of the trees are held out"
    assert split_by_group(conversations) == (train, val)


def test_tiny_data_still_holds_out_one_whole_group():
    conversations = list(oasst_conversations(arithmetic_tree(1) + arithmetic_tree(2), {"en"}, "all"))
    train, val = split_by_group(conversations)
    assert train and val and not {c["group"] for c in train} & {c["group"] for c in val}


def test_training_conversations_that_quote_validation_messages_are_dropped():
    shared, own = "A long answer that appears in both sets, word for word. " * 2, "Another long answer. " * 4
    train = [make_conversation([("user", "Thanks!"), ("assistant", shared)], "a"),
             make_conversation([("user", "Thanks!"), ("assistant", own)], "b")]
    val = [make_conversation([("user", "Thanks!"), ("assistant", shared)], "c")]
    assert decontaminate(train, val) == train[1:], "long shared messages leak; short ones do not count"


def test_langs_parsing():
    assert parse_langs("all") is None
    assert parse_langs("en, pt-BR") == {"en", "pt-BR"}
    with pytest.raises(UserError, match="unknown language"):
        parse_langs("english")


def test_texts_file_is_reused_when_sources_match_and_user_files_are_kept(tmp_path, oasst_file):
    args = newgpt.build_parser().parse_args(["--data", str(oasst_file), "--texts", str(tmp_path / "t.json")])
    _, cfg, _ = newgpt.configs_from_args(args)
    texts, how = load_or_build_texts(cfg)
    assert how == "built" and texts["train"] and texts["val"]
    assert load_or_build_texts(cfg)[1] == "reused"
    cfg.langs = "all"
    assert load_or_build_texts(cfg)[1] == "built", "other options rebuild the file"

    own = {"train": [{"turns": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
                     for i in range(30)]}
    (tmp_path / "t.json").write_text(json.dumps(own))
    texts, how = load_or_build_texts(cfg)
    assert how == "reused" and texts["val"], "a user's own file is used as is, with a split made for it"


def test_oasst_table_in_parquet_reads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = arithmetic_tree(7)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    write_jsonl(tmp_path / "t.jsonl", rows)
    from_parquet = conversations_from_sources([str(tmp_path / "t.parquet")], "train", {"en"}, "all")
    from_jsonl = conversations_from_sources([str(tmp_path / "t.jsonl")], "train", {"en"}, "all")
    assert [c["turns"] for c in from_parquet] == [c["turns"] for c in from_jsonl] and len(from_parquet) == 2


def test_missing_path_and_bad_json_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl, line 3: not valid JSON"):
        read_source(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(UserError, match="cannot read"):
        read_source(str(tmp_path / "bad.jsonl.gz"))


@pytest.mark.parametrize("content", ['{"train": {"turns": []}}', '{"train": [{"turns": "hi"}]}', '[1, 2]',
                                     '{"train": [{"turns": []}], "val": "x"}', "not json"])
def test_a_malformed_texts_file_is_a_user_error(tmp_path, content):
    (tmp_path / "t.json").write_text(content)
    with pytest.raises(UserError, match="is not a TinyGPT texts file"):
        read_texts_file(tmp_path / "t.json")
