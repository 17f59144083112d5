"""Evaluation prompts: the contexts a concept is generated in for CLIP-I, CLIP-T and DINO.

A template holds ``{}`` where the concept phrase goes: the phrase is the concept's token and
class word ("<v1> dog"); CLIP-T compares each image with its prompt made with the class word
alone ("a dog on the beach"), as DreamBooth does. ``--eval_prompts FILE`` gives one template per
line (blank lines and lines starting with # skipped); otherwise the built-in contextual set is
used on Stable Diffusion backbones, and on the embedded tiny model (whose vocabulary has no
scenes) each concept's own prompt.
"""
from __future__ import annotations

from pathlib import Path

#: contexts in the spirit of DreamBooth's evaluation prompts (Ruiz et al. 2023): places,
#: backgrounds, materials and styles, the same for every concept
CONTEXTUAL_PROMPTS = (
    "a photo of a {}",
    "a {} on the beach",
    "a {} in the jungle",
    "a {} in the snow",
    "a {} on a cobblestone street",
    "a {} on top of a wooden floor",
    "a {} with a city in the background",
    "a {} with a mountain in the background",
    "a {} on top of a purple rug in a forest",
    "a {} with a blue house in the background",
    "a {} floating on top of water",
    "a {} on a white table in a bright kitchen",
    "a {} in a garden full of flowers",
    "a {} at night under the stars",
    "a watercolor painting of a {}",
    "a {} in front of a red brick wall",
)


def prompt_lines(text: str) -> list[str]:
    """The prompts of a prompt file: one per line, stripped; blank lines and ``#`` comments skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


class EvalPromptsError(ValueError):
    """An --eval_prompts file that cannot be used (one-line message)."""


def load_eval_prompts(path) -> tuple[str, ...]:
    """The templates of an ``--eval_prompts`` file; each must contain ``{}`` exactly once."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalPromptsError(f"--eval_prompts: {path} cannot be read ({type(exc).__name__})") from None
    templates = tuple(prompt_lines(text))
    if not templates:
        raise EvalPromptsError(f"--eval_prompts: {path} holds no prompt")
    for i, t in enumerate(templates):
        if t.count("{}") != 1:
            raise EvalPromptsError(f"--eval_prompts: {path}: prompt {i + 1} {t!r} must contain '{{}}' (the concept) exactly once")
    return templates


def prompt_without_class_word(concept) -> str:
    """The concept's prompt with the class word after its token removed ("a photo of <v1> star"
    -> "a photo of <v1>"); unchanged when no class word follows the token."""
    words = concept.prompt.split()
    word = _class_word(concept)
    if concept.token in words:
        at = words.index(concept.token) + 1
        if word and at < len(words) and words[at] == word:
            del words[at]
    return " ".join(words)


def _class_word(concept) -> str:
    """The concept's class word; without one (``--instance_data_dir``, ``--concepts_dir``), the
    word after the token in its prompt ("a photo of <v1> dog" -> "dog"), as DreamBooth's "sks dog"."""
    if concept.class_word:
        return concept.class_word
    words = concept.prompt.split()
    at = words.index(concept.token) + 1 if concept.token in words else len(words)
    return words[at] if at < len(words) else ""


def concept_phrase(concept, with_token: bool = True) -> str:
    """"<v1> dog" (token and class word), "dog" without the token; the token alone (and "object")
    if neither the concept nor its prompt names a class word, or if the method prompts the token
    without its class word (``Concept.class_word_in_prompt``, C-LoRA)."""
    word = _class_word(concept)
    if not with_token:
        return word or "object"
    if not getattr(concept, "class_word_in_prompt", True):
        return concept.token
    return f"{concept.token} {word}".strip()


def concept_eval_prompts(concept, templates, count: int) -> tuple[list[str], list[str]]:
    """(prompts with the token, the same without it) for ``count`` images of ``concept``: of P
    templates, image i uses template ⌊i·P/count⌋ (fewer images than templates spread evenly over
    the list; more give each template ⌊count/P⌋ or ⌈count/P⌉ consecutive images); ``templates``
    None means the concept's own prompt. ``{}`` is replaced as text (not ``str.format``), so a
    template may hold other braces."""
    if templates is None:
        plain = concept.prompt.replace(concept.token, "").replace("  ", " ").strip()
        return [concept.prompt] * count, [plain] * count
    P = len(templates)
    picked = [templates[i * P // count] for i in range(count)]
    return ([t.replace("{}", concept_phrase(concept)) for t in picked],
            [t.replace("{}", concept_phrase(concept, with_token=False)) for t in picked])
