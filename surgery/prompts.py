"""Seed prompts for sampling a calibration corpus from the dense model itself (data: prompted / mix-prompted).

Sampling from BOS alone gives whatever the model writes unprompted: for SmolLM2-Instruct, mostly essay-like
prose. Asking it for many kinds of text instead spreads the corpus over the model's own abilities, so that
distillation keeps them all in step, not only the calibration file's domain. The prompts are short, generic
requests by category; the corpus keeps only what the model writes after them (never the prompt text).
`code` asks for programs in several languages, so a code evaluation is no longer an unseen domain when it is
included: `categories` leaves it out (see README, round 13).
"""

from __future__ import annotations

PROMPTS: dict[str, list[str]] = {
    "code": [
        "Write a Python function that merges two sorted lists, with a docstring and tests.",
        "Write a small Python class for a bank account with deposit, withdraw and a history of transactions.",
        "Show a Python script that reads a CSV file and prints the average of each numeric column.",
        "Implement binary search in JavaScript and explain each line.",
        "Write a C function that reverses a linked list in place.",
        "Write a Bash script that backs up a directory into a dated tar archive.",
        "Write SQL queries that create a table of orders and report the monthly revenue per customer.",
        "Write a Rust program that counts word frequencies in a text file.",
        "Write an HTML page with a form for signing up to a newsletter, with CSS styling.",
        "Explain Python decorators with a few code examples.",
        "Write a Python command-line tool with argparse that renames files by a pattern.",
        "Write a Java class implementing a thread-safe counter.",
    ],
    "math": [
        "Solve step by step: a train travels 240 km in 3 hours, then 150 km in 2 hours. What is its average speed?",
        "Explain how to solve a quadratic equation, with a worked example.",
        "Prove that the square root of 2 is irrational.",
        "What is the derivative of x^3 sin(x)? Show the steps.",
        "Explain what a prime number is and list the primes below 100.",
        "A recipe for 4 people needs 300 g of flour. How much for 10 people? Explain.",
        "Explain the Pythagorean theorem and give three applications.",
        "What is the probability of getting at least one six in four rolls of a die?",
    ],
    "science": [
        "Explain how photosynthesis works.",
        "Why is the sky blue?",
        "Describe the structure of an atom.",
        "How do vaccines train the immune system?",
        "Explain plate tectonics and how earthquakes happen.",
        "What causes the seasons on Earth?",
        "Explain how a transistor works.",
        "Describe the water cycle.",
    ],
    "history": [
        "Summarize the causes of the First World War.",
        "Describe daily life in ancient Rome.",
        "Write a short biography of Marie Curie.",
        "What was the Industrial Revolution and how did it change cities?",
        "Describe the history of the printing press.",
        "Explain the rise and fall of the Mongol Empire.",
    ],
    "everyday": [
        "Give me a recipe for a vegetable curry.",
        "Write an email to my landlord about a broken heater.",
        "Plan a three-day trip to Lisbon.",
        "How do I prepare for a job interview?",
        "Give tips for keeping houseplants healthy.",
        "Write a polite message declining a meeting invitation.",
        "How can I save money on groceries?",
        "Explain how to change a flat tire.",
    ],
    "creative": [
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Write a poem about autumn rain.",
        "Write a dialogue between a detective and a suspect.",
        "Describe a futuristic city in vivid detail.",
        "Write a fairy tale for children about a brave snail.",
        "Write a limerick about a cat who loves coffee.",
    ],
    "business": [
        "Write a product description for a reusable water bottle.",
        "Summarize the pros and cons of remote work.",
        "Write meeting notes for a project kickoff.",
        "Explain what inflation is and how it affects savings.",
        "Draft a short business plan for a neighbourhood bakery.",
        "Write a cover letter for a junior data analyst position.",
    ],
    "structured": [
        "Make a markdown table comparing five programming languages.",
        "Give a JSON example describing a library book, and explain its fields.",
        "List twenty countries with their capitals.",
        "Write a YAML configuration for a web server with comments.",
        "Write a numbered checklist for moving to a new apartment.",
        "Give a glossary of ten machine learning terms.",
    ],
}


def seed_prompts(categories: list[str] | None = None) -> list[str]:
    """The prompts of `categories` (all by default), in a fixed order."""
    cats = list(PROMPTS) if categories is None else categories
    unknown = [c for c in cats if c not in PROMPTS]
    if unknown:
        raise ValueError(f"unknown prompt categories {unknown}: choose from {sorted(PROMPTS)}")
    return [p for c in cats for p in PROMPTS[c]]
