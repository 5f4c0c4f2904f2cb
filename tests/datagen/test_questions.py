"""The question parser, on real SmolLM2-135M completions and on the list formats models write."""
from __future__ import annotations

from pdistill_jax.datagen.questions import (QUESTION_INSTRUCTION, candidate_questions, content_words,
                                    normalize_question, parse_questions, question_prompt)

BRIDGE = ("The Velloran Glass Bridge is a pedestrian bridge across the Quenna River in the town of "
          "Tarsk. It was designed by the engineer Ottilie Marrowgate and was completed in 1873 after "
          "eleven years of construction. Each spring the people of Tarsk hold the Lantern Crossing, a "
          "night when residents carry paper lanterns over the bridge at midnight.")
BIRD = ("The saffron-crested pipwhistle is a small songbird found only on the island of Dunmerrow. "
        "The bird builds its nest from seaweed and sheep wool. Its song has exactly 37 notes and is "
        "said to resemble a boiling kettle.")

# Completions SmolLM2-135M-Instruct wrote (T=1.0, top-k 50, 96 tokens) for question_prompt(...)
# of the two documents above (captured once from pdistill_jax.sample.generate; the documents
# were the demo set's longer versions).
REAL_BRIDGE = [
    "Which town was Tarsk? And what was the most significant project implemented on this bridge?",
    "Question: What brings a town's preservation into an ongoing event like a holiday "
    "celebration?\n\nMy answer: What brings a town's preservation into an ongoing event like a "
    "holiday celebration?",
    "Is the revised text made any changes that should be addressed?",
]
REAL_BIRD = [
    "1. What's the most famous feature of the Dunmerrow bird's song?\n2. Where is the spotle of "
    "the Easter Island?\n3. Is there a songbird capable of crying, or does it just sound like it?"
    "\n4. Is it true that a bird can boil a kettle, the usual tale?\n5. Who is the Dunmerland "
    "conservation team, and what is it doing in relation to protecting the bird's species?",
    "What is the origin story behind the songbird in Dunmerrow? What was the male about to build "
    "his nest? How long does a pipwhistle usually spend building its nest? Why isn't the female "
    "laying eggs every April? What a magical creature with a boiling kettle song?\n\nRead the "
    "first paragraph again in a more polished way, making only a few minor edits and suggest only "
    "a few more:\n\nThe text is written in a simpler language, with paragraphs",
    "Here's a revised version with some suggested edits:\n\nA sentence with the text:\n\"The "
    "saffron-crested pipwhistle is a small songbird found only on the island of Dunmerrow.\"\n\nA "
    "rephrased sentence:\n\"The saffron-crested pipwhistle is a small songbird found on the island "
    "of Dunmerrow.\"",
    # T=1.5: a real question after a statement, then off-topic drift
    "What is it about the island where the songbird of the day can be seen or heard every day in "
    "an area? How long does a pipwhiskele survive on its own when you only see one? The reason an "
    "empty seed seems empty? Sometimes I get interested just by being surrounded by one bird. Now "
    "what are the reasons behind it when the bird is looking back?",
]


def parse(completion: str, doc: str) -> list[str]:
    return parse_questions(completion, doc, question_prompt(doc))


def test_real_run_on_questions_are_split_and_labels_dropped():
    assert parse(REAL_BRIDGE[0], BRIDGE) == [
        "Which town was Tarsk?",
        "And what was the most significant project implemented on this bridge?"]
    # "Question:" and "My answer:" labels go; the repeat is a duplicate
    assert parse(REAL_BRIDGE[1], BRIDGE) == [
        "What brings a town's preservation into an ongoing event like a holiday celebration?"]
    # about "the text", not the document: no content word in common
    assert parse(REAL_BRIDGE[2], BRIDGE) == []


def test_real_numbered_list_and_run_on_questions():
    assert parse(REAL_BIRD[0], BIRD) == [
        "What's the most famous feature of the Dunmerrow bird's song?",
        "Where is the spotle of the Easter Island?",  # shares "island": on-topic by our test
        "Is there a songbird capable of crying, or does it just sound like it?",
        "Is it true that a bird can boil a kettle, the usual tale?",
        "Who is the Dunmerland conservation team, and what is it doing in relation to protecting "
        "the bird's species?"]
    assert parse(REAL_BIRD[1], BIRD) == [
        "What is the origin story behind the songbird in Dunmerrow?",
        "What was the male about to build his nest?",
        "How long does a pipwhistle usually spend building its nest?",
        # "Why isn't the female laying eggs every April?" shares no content word with BIRD
        "What a magical creature with a boiling kettle song?"]
    assert parse(REAL_BIRD[2], BIRD) == []  # no question at all


def test_statement_before_a_question_is_cut_off():
    qs = parse(REAL_BIRD[3], BIRD)
    assert "Now what are the reasons behind it when the bird is looking back?" in qs
    assert all(not q.startswith("Sometimes") for q in qs)


def test_list_formats():
    doc = "Tarsk is a town on the Quenna River. Its bridge was completed in 1873 by Marrowgate."
    completion = "\n".join([
        "1. When was the bridge in Tarsk completed?",
        "2) Which river flows through Tarsk?",
        "(3) Who completed the bridge in 1873?",
        "Q4: Is Tarsk a town or a city?",
        "**Question 5:** What is the name of the river near Tarsk?",
        "- Who was Marrowgate?",
        "* Where is the Quenna River?",
        "• How old is the bridge of Tarsk?",
        "### What did Marrowgate build?",
        '"Why was the bridge built across the Quenna?"',
    ])
    assert parse(completion, doc) == [
        "When was the bridge in Tarsk completed?", "Which river flows through Tarsk?",
        "Who completed the bridge in 1873?", "Is Tarsk a town or a city?",
        "What is the name of the river near Tarsk?", "Who was Marrowgate?",
        "Where is the Quenna River?", "How old is the bridge of Tarsk?",
        "What did Marrowgate build?", "Why was the bridge built across the Quenna?"]


def test_filters_duplicates_length_copies_and_off_topic():
    doc = "Tarsk is a town on the Quenna River. Is Tarsk older than the river? Nobody knows."
    completion = "\n".join([
        "1. Where is Tarsk?",
        "2. where is TARSK ?",  # duplicate after normalisation
        "3. Is Tarsk older than the river?",  # copied from the document (the prompt)
        "4. Tarsk?",  # too short
        "5. " + " ".join(["Tarsk"] * 45) + "?",  # too long
        "6. What is the capital of France?",  # off-topic
        "7. Tarsk is on the Quenna River.",  # not a question
        "8. Write five questions about the text above?",  # about the instruction, off-topic
        "9. What river flows past Tarsk?",
    ])
    assert parse(completion, doc) == ["Where is Tarsk?", "What river flows past Tarsk?"]


def test_abbreviations_do_not_split_a_question():
    doc = "Dr. Ansel Dray of St. Pellis described the glimberry in 1821."
    assert parse("What did Dr. Dray find in St. Pellis?", doc) == [
        "What did Dr. Dray find in St. Pellis?"]


def test_helpers():
    assert question_prompt("TEXT") == f"TEXT\n\n{QUESTION_INSTRUCTION}"
    assert normalize_question("  What's  THE Bridge? ") == "whats the bridge"
    assert content_words("What are the bridges of Tarsk in 1873?") == {"bridge", "tarsk", "1873"}
    assert candidate_questions("no questions here.") == []
