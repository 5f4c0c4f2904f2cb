"""One-off curation tool for the demo corpus; not part of the library or its tests.

Why it exists: the demo ships ``general_knowledge.jsonl``, questions the base
model (SmolLM2-135M-Instruct) answers correctly, so that a drop in accuracy on
them after distillation measures forgetting rather than questions the model
never knew. This script asks the base model a built-in list of very easy
questions (greedy, its chat template and default system prompt, at most 48 new
tokens) and keeps those it gets right by ``pdistill_jax.evaluate.match``.

With ``--closed-book-demo`` it instead answers the demo test questions twice,
closed-book and with the gold document in the prompt
(``{document}\\n\\n---\\n\\n{question}``), writes both prediction files and
prints their accuracy: closed-book must be near zero (the questions probe facts
the model cannot know), gold-context shows the ceiling distillation aims at.

It uses torch + transformers (reading the GGUF checkpoint directly) as an
independent reference implementation; torch is only a test/benchmark
dependency of the project.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdistill_jax.infer.evaluate import evaluate, match, normalize_answer, write_results  # noqa: E402
from pdistill_jax.files import read_jsonl, write_jsonl_atomic  # noqa: E402

DEMO = REPO / "pdistill_jax" / "assets" / "demo"
MAX_NEW_TOKENS = 48

CANDIDATES: list[tuple[str, list[str]]] = [
    ("What is the capital of France?", ["Paris"]),
    ("What is the capital of Italy?", ["Rome"]),
    ("What is the capital of Germany?", ["Berlin"]),
    ("What is the capital of Spain?", ["Madrid"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("What is the capital of the United Kingdom?", ["London"]),
    ("What is the capital of Russia?", ["Moscow"]),
    ("What is the capital of China?", ["Beijing"]),
    ("What is the capital of Egypt?", ["Cairo"]),
    ("What is the capital of Greece?", ["Athens"]),
    ("What is the capital of Canada?", ["Ottawa"]),
    ("What is the capital of Australia?", ["Canberra"]),
    ("What is the capital of the United States?", ["Washington"]),
    ("What is the capital of India?", ["New Delhi", "Delhi"]),
    ("What is the capital of Portugal?", ["Lisbon"]),
    ("What is the capital of Ireland?", ["Dublin"]),
    ("What is the capital of Norway?", ["Oslo"]),
    ("What is the capital of Sweden?", ["Stockholm"]),
    ("What is the capital of Austria?", ["Vienna"]),
    ("What is the capital of Poland?", ["Warsaw"]),
    ("What is the capital of Mexico?", ["Mexico City"]),
    ("What is the capital of Argentina?", ["Buenos Aires"]),
    ("What is the capital of South Korea?", ["Seoul"]),
    ("What is the capital of Thailand?", ["Bangkok"]),
    ("What is the capital of Kenya?", ["Nairobi"]),
    ("What is the capital of Turkey?", ["Ankara"]),
    ("What is the capital of the Netherlands?", ["Amsterdam"]),
    ("What is the capital of Denmark?", ["Copenhagen"]),
    ("What is the capital of Finland?", ["Helsinki"]),
    ("What is the capital of Belgium?", ["Brussels"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("Which planet is known as the Red Planet?", ["Mars"]),
    ("Which planet is closest to the Sun?", ["Mercury"]),
    ("What is the name of the star at the centre of our solar system?", ["Sun"]),
    ("What is the natural satellite of the Earth called?", ["Moon"]),
    ("Which planet is famous for its large rings?", ["Saturn"]),
    ("What is the chemical symbol for water?", ["H2O"]),
    ("What is the chemical symbol for gold?", ["Au"]),
    ("What gas do plants absorb from the air for photosynthesis?", ["carbon dioxide", "CO2"]),
    ("What gas do humans need to breathe to survive?", ["oxygen"]),
    ("At what temperature in degrees Celsius does water boil at sea level?", ["100"]),
    ("At what temperature in degrees Celsius does water freeze?", ["0", "zero"]),
    ("What is the freezing point of water in degrees Fahrenheit?", ["32"]),
    ("What force pulls objects towards the Earth?", ["gravity"]),
    ("What is the hardest natural substance?", ["diamond"]),
    ("What organ pumps blood through the human body?", ["heart"]),
    ("Which organ do humans use to breathe?", ["lungs", "lung"]),
    ("How many legs does a spider have?", ["eight", "8"]),
    ("How many legs does an insect have?", ["six", "6"]),
    ("How many days are there in a week?", ["seven", "7"]),
    ("How many months are there in a year?", ["twelve", "12"]),
    ("How many days are there in a leap year?", ["366"]),
    ("How many hours are there in a day?", ["24", "twenty-four"]),
    ("How many minutes are there in an hour?", ["60", "sixty"]),
    ("How many sides does a triangle have?", ["three", "3"]),
    ("How many sides does a hexagon have?", ["six", "6"]),
    ("How many continents are there on Earth?", ["seven", "7"]),
    ("What is the largest ocean on Earth?", ["Pacific"]),
    ("What is the longest river in Africa?", ["Nile"]),
    ("What is the tallest mountain in the world?", ["Everest"]),
    ("What is the largest desert in Africa?", ["Sahara"]),
    ("What is the largest country in the world by area?", ["Russia"]),
    ("On which continent is Egypt?", ["Africa"]),
    ("On which continent is Brazil?", ["South America"]),
    ("What colour is the sky on a clear day?", ["blue"]),
    ("What colour is grass?", ["green"]),
    ("What colour are ripe bananas?", ["yellow"]),
    ("What colour do you get by mixing blue and yellow?", ["green"]),
    ("What colour do you get by mixing red and white?", ["pink"]),
    ("What colour is snow?", ["white"]),
    ("Who wrote Romeo and Juliet?", ["Shakespeare"]),
    ("Who wrote Hamlet?", ["Shakespeare"]),
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "Leonardo", "da Vinci"]),
    ("Who developed the theory of relativity?", ["Einstein"]),
    ("Who was the first President of the United States?", ["George Washington", "Washington"]),
    ("Who discovered penicillin?", ["Alexander Fleming", "Fleming"]),
    ("Who proposed the theory of evolution by natural selection?", ["Darwin"]),
    ("Who formulated the laws of motion and universal gravitation?", ["Newton"]),
    ("Who was the first person to walk on the Moon?", ["Neil Armstrong", "Armstrong"]),
    ("Who wrote the Harry Potter books?", ["Rowling"]),
    ("Who composed the Fifth Symphony that begins with four famous notes?", ["Beethoven"]),
    ("Who invented the telephone?", ["Alexander Graham Bell", "Bell"]),
    ("Who is known for inventing the light bulb?", ["Edison"]),
    ("What is the largest mammal in the world?", ["blue whale"]),
    ("What is the fastest land animal?", ["cheetah"]),
    ("What animal is known as the king of the jungle?", ["lion"]),
    ("What do bees make?", ["honey"]),
    ("What is a baby cat called?", ["kitten"]),
    ("What is a baby dog called?", ["puppy"]),
    ("Which animal has a long neck and lives in Africa?", ["giraffe"]),
    ("What do caterpillars turn into?", ["butterfly", "butterflies", "moth"]),
    ("What is the main language spoken in Brazil?", ["Portuguese"]),
    ("What is the main language spoken in Mexico?", ["Spanish"]),
    ("What is the currency of Japan?", ["yen"]),
    ("What is the currency of the United Kingdom?", ["pound"]),
    ("What currency is used in most countries of the European Union?", ["euro"]),
    ("In which country are the pyramids of Giza?", ["Egypt"]),
    ("In which city is the Eiffel Tower?", ["Paris"]),
    ("In which country is the Great Wall?", ["China"]),
    ("In which city is the Colosseum?", ["Rome"]),
    ("In which country is the Taj Mahal?", ["India"]),
    ("In which city is the Statue of Liberty?", ["New York"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What is the opposite of day?", ["night"]),
    ("What is the plural of mouse?", ["mice"]),
    ("What is the square root of 81?", ["9", "nine"]),
    ("What is 7 multiplied by 8?", ["56"]),
    ("What is 12 multiplied by 12?", ["144"]),
    ("What is half of 100?", ["50", "fifty"]),
    ("How many centimetres are there in a metre?", ["100"]),
    ("How many grams are there in a kilogram?", ["1000", "1,000", "thousand"]),
    ("What is the boiling point of water in degrees Fahrenheit?", ["212"]),
    ("What is the largest organ of the human body?", ["skin"]),
    ("How many bones are in the adult human body?", ["206"]),
    ("What is the main ingredient of guacamole?", ["avocado"]),
    ("What is the primary ingredient in bread?", ["flour"]),
    ("What do you call frozen water?", ["ice"]),
    ("What instrument has 88 keys?", ["piano"]),
    ("What sport is played at Wimbledon?", ["tennis"]),
    ("How many players are on a football (soccer) team on the field?", ["eleven", "11"]),
    ("What is the name of the process by which plants make food from sunlight?", ["photosynthesis"]),
    ("What is the smallest prime number?", ["2", "two"]),
]


def load_model(model_dir: Path, gguf_file: str):
    """Load tokenizer and model (de-quantised to float32) from the GGUF checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file)
    model.eval()
    return tokenizer, model


def answer(tokenizer, model, user_message: str) -> str:
    """Greedy completion of one user turn under the chat template's default system prompt.

    One prompt at a time, no padding, so results do not depend on batch composition.
    """
    import torch

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def answer_all(tokenizer, model, messages: list[str], label: str) -> list[str]:
    """Answer each message, printing progress since a CPU run takes minutes."""
    start = time.time()
    outputs = []
    for i, message in enumerate(messages, start=1):
        outputs.append(answer(tokenizer, model, message))
        if i % 20 == 0 or i == len(messages):
            print(f"[{label}] {i}/{len(messages)} in {time.time() - start:.0f}s", flush=True)
    return outputs


def answered_correctly(prediction: str, answers: list[str]) -> bool:
    """``match``, and an accepted answer occurs as whole words of the prediction.

    Stricter than ``match`` on purpose: a substring hit such as "0" inside
    "-18.0" or "kitten" inside "kittens" is luck, and a retention question the
    model only passes by luck would make forgetting look random.
    """
    words = f" {normalize_answer(prediction)} "
    return match(prediction, answers) and any(f" {normalize_answer(a)} " in words for a in answers)


def curate(tokenizer, model, out_path: Path) -> None:
    """Keep the candidate questions the base model answers correctly and write them."""
    predictions = answer_all(tokenizer, model, [q for q, _ in CANDIDATES], "general knowledge")
    verdicts = [answered_correctly(p, a) for (_, a), p in zip(CANDIDATES, predictions)]
    kept = [{"question": q, "answers": a} for (q, a), ok in zip(CANDIDATES, verdicts) if ok]
    for (q, _), p, ok in zip(CANDIDATES, predictions, verdicts):
        print(f"  {'kept' if ok else 'dropped'}: {q!r} -> {p!r}")
    write_jsonl_atomic(out_path, kept)
    print(f"kept {len(kept)}/{len(CANDIDATES)} -> {out_path}")


def demo_baselines(tokenizer, model, out_dir: Path) -> None:
    """Answer the demo questions closed-book and with the gold document; write and report both."""
    documents = {d["id"]: d["text"] for d in read_jsonl(DEMO / "documents.jsonl")}
    questions = read_jsonl(DEMO / "questions.jsonl")
    settings = {
        "closed_book": [q["question"] for q in questions],
        "gold_document": [f"{documents[q['doc_id']]}\n\n---\n\n{q['question']}" for q in questions],
    }
    for name, messages in settings.items():
        outputs = answer_all(tokenizer, model, messages, name)
        predictions = [
            {"question": q["question"], "doc_id": q["doc_id"], "prediction": p}
            for q, p in zip(questions, outputs)
        ]
        write_jsonl_atomic(out_dir / name / "predictions.jsonl", predictions)
        summary, rows = evaluate(questions, predictions)
        write_results(out_dir / name, summary, rows)
        correct = sum(r["match"] for r in rows)
        print(f"{name}: match accuracy {summary['match_accuracy']:.3f} ({correct}/{summary['n']})")
        if name == "closed_book":
            for r in rows:
                if r["match"]:
                    print(f"  guessed: {r['question']!r} -> {r['prediction']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path(os.path.expanduser("~/.cache/pdistill")))
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--out", type=Path, default=DEMO / "general_knowledge.jsonl",
                        help="where to write the curated general-knowledge questions")
    parser.add_argument("--closed-book-demo", action="store_true",
                        help="instead of curating, answer the demo questions closed-book "
                             "and with the gold document")
    parser.add_argument("--predictions-dir", type=Path, default=REPO / "runs" / "demo_baselines",
                        help="output folder for --closed-book-demo")
    args = parser.parse_args()

    tokenizer, model = load_model(args.model_dir, args.gguf_file)
    if args.closed_book_demo:
        demo_baselines(tokenizer, model, args.predictions_dir)
    else:
        curate(tokenizer, model, args.out)


if __name__ == "__main__":
    main()
