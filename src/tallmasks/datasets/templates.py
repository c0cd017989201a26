"""CLIP prompt templates per dataset, as used by the paper's zero-shot heads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    """A prompt template: called with a class name, returns the prompt (picklable, unlike a lambda)."""

    pattern: str  # contains "{c}" where the class name goes

    def __call__(self, classname: str) -> str:
        return self.pattern.replace("{c}", str(classname))


def _templates(*patterns: str) -> list[Template]:
    return [Template(p) for p in patterns]


_PHOTO_OF_A_THE = ("a photo of a {c}.", "a photo of the {c}.")

_CIFAR = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.",
    "a high contrast photo of a {c}.",
    "a bad photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    "a photo of the {c}.",
    "a blurry photo of the {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.",
    "a bad photo of the {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the big {c}.",
)

_RESISC45 = tuple(
    f"{source} {kind} of {article}{{c}}."
    for article in ("", "a ", "the ")
    for source, kind in (
        ("satellite", "imagery"),
        ("aerial", "imagery"),
        ("satellite", "photo"),
        ("aerial", "photo"),
        ("satellite", "view"),
        ("aerial", "view"),
    )
)

TEMPLATES: dict[str, list[Template]] = {
    "Cars": _templates(
        "a photo of a {c}.",
        "a photo of the {c}.",
        "a photo of my {c}.",
        "i love my {c}!",
        "a photo of my dirty {c}.",
        "a photo of my clean {c}.",
        "a photo of my new {c}.",
        "a photo of my old {c}.",
    ),
    "DTD": _templates(
        *(f"a photo of {article} {{c}} {noun}." for article in ("a", "the") for noun in ("texture", "pattern", "thing", "object"))
    ),
    "EuroSAT": _templates(
        "a centered satellite photo of {c}.",
        "a centered satellite photo of a {c}.",
        "a centered satellite photo of the {c}.",
    ),
    "GTSRB": _templates(
        'a zoomed in photo of a "{c}" traffic sign.',
        'a centered photo of a "{c}" traffic sign.',
        'a close up photo of a "{c}" traffic sign.',
    ),
    "MNIST": _templates('a photo of the number: "{c}".'),
    "RESISC45": _templates(*_RESISC45),
    "SVHN": _templates('a photo of the number: "{c}".'),
    "SUN397": _templates(*_PHOTO_OF_A_THE),
    "STL10": _templates(*_PHOTO_OF_A_THE),
    "OxfordIIITPet": _templates("a photo of a {c}, a type of pet."),
    "Flowers102": _templates("a photo of a {c}, a type of flower."),
    "CIFAR100": _templates(*_CIFAR),
    "PCAM": _templates("this is a photo of {c}"),
    "FER2013": _templates(
        "a photo of a {c} looking face.",
        "a photo of a face showing the emotion: {c}.",
        "a photo of a face looking {c}.",
        "a face that looks {c}.",
        "they look {c}.",
        "look at how {c} they are.",
    ),
    "CIFAR10": _templates(*_CIFAR),
    "Food101": _templates("a photo of {c}, a type of food."),
    "FashionMNIST": _templates(*_PHOTO_OF_A_THE),
    "RenderedSST2": _templates("a {c} review of a movie."),
    "EMNIST": _templates('a photo of the digit character: "{c}".'),
    "KMNIST": _templates("a photo of the character {c}."),
}
