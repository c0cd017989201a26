"""open_clip image encoder, zero-shot classification heads, classifier, checkpoint paths."""

from tallmasks.models.encoder import (
    DEMO_CNN_MODEL,
    DEMO_MODEL,
    MODELS,
    ImageEncoder,
    create_clip,
    create_clip_and_transforms,
    get_tokenizer,
    known_models,
    load_image_encoder,
    register_demo_model,
    save_zeroshot_encoder,
    text_model,
)
from tallmasks.models.heads import (
    ClassificationHead,
    ImageClassifier,
    build_zeroshot_head,
    get_classification_head,
)
from tallmasks.models.paths import dataset_zeroshot_path, finetuned_path, head_path, val_name, zeroshot_path

__all__ = [
    "DEMO_CNN_MODEL",
    "DEMO_MODEL",
    "MODELS",
    "ClassificationHead",
    "ImageClassifier",
    "ImageEncoder",
    "build_zeroshot_head",
    "create_clip",
    "create_clip_and_transforms",
    "dataset_zeroshot_path",
    "finetuned_path",
    "get_classification_head",
    "get_tokenizer",
    "head_path",
    "known_models",
    "load_image_encoder",
    "register_demo_model",
    "save_zeroshot_encoder",
    "text_model",
    "val_name",
    "zeroshot_path",
]
