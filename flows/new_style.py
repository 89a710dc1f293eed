"""Train a new style from a form: the parameters are one pydantic model, so the Prefect UI renders a form
with titles, descriptions, defaults and validation, and bad values are refused before any training starts.

    check the inputs -> train-style (priming cached) -> the new model's URL
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.train_style import train_style
from stylecore.store import MODEL_NAME_PATTERN, check_new_model_name, default_home
from tasks.storage import IMAGE_EXTENSIONS, Location, StorageError, list_files
from tasks.secrets import StorageSecrets, redact, reveal_options, with_secret_block


class TrainStyleRequest(BaseModel):
    """A new style model: which painting, which photos, how long to train."""

    model_config = ConfigDict(title="New style model", extra="forbid")

    style_image_url: str = Field(title="Style image URL", min_length=1,
                                 description="The painting whose style to learn: a path or URL (gs://, file://, ...).")
    model_name: str = Field(title="Model name", pattern=MODEL_NAME_PATTERN,
                            description="Name of the new model in the model store: letters, digits, '.', '_', '-'.")
    photos_url: str = Field(title="Photo set URL", min_length=1,
                            description="Folder or bucket prefix of training photos, searched recursively.")
    preset: Literal["fast", "full"] = Field("fast", title="Training preset",
                                            description="fast: minutes on a CPU; full: the original budget "
                                                        "(60 priming + 120 style epochs at 256 px), for a GPU.")
    style_weight: float = Field(1.0, gt=0, le=1e6, title="Style weight",
                                description="Weight of the style (Gram) loss.")
    content_weight: float = Field(0.25, ge=0, le=1e6, title="Content weight",
                                  description="Weight of the content (feature) loss; higher keeps more of the photo.")
    tv_weight: float = Field(0.0, ge=0, le=1e6, title="Total-variation weight",
                             description="Smoothness term; 0 turns it off.")
    steps: int | None = Field(None, ge=1, le=10_000_000, title="Style steps",
                              description="Override the preset's number of style-training steps.")
    prime_steps: int | None = Field(None, ge=1, le=10_000_000, title="Priming steps",
                                    description="Override the preset's number of priming steps.")
    image_size: int | None = Field(None, ge=32, le=2048, title="Crop size",
                                   description="Override the preset's training crop size in pixels.")
    model_store: str | None = Field(None, title="Model store URL",
                                    description="Where models are kept; default: the worker's $STYLIZE_HOME.")
    replace: bool = Field(False, title="Replace an existing model",
                          description="Retrain a name that already has a model (its weights are replaced; runs "
                                      "still using the old ones fail rather than mix the two).")

    @field_validator("model_name")
    @classmethod
    def _a_name_a_new_model_can_have(cls, name: str) -> str:
        return check_new_model_name(name)  # what the form's pattern cannot say (".safetensors" at the end)


@flow(name="train-new-style")
def train_new_style(request: TrainStyleRequest, storage_options: StorageSecrets | dict | None = None,
                    storage_secret_block: str | None = None) -> str:
    """Train one new style model from the form's values; returns the model's URL. Storage credentials: best as the
    name of a Prefect Secret block holding them (a JSON object), which is all the run records."""
    storage_options = with_secret_block(storage_options, storage_secret_block)
    check_inputs(request, reveal_options(storage_options))
    [model] = train_style(
        [request.style_image_url], request.photos_url, request.model_store or str(default_home()),
        names=[request.model_name], preset=request.preset, steps=request.steps, prime_steps=request.prime_steps,
        image_size=request.image_size, style_weight=request.style_weight, content_weight=request.content_weight,
        tv_weight=request.tv_weight,
        storage_options=storage_options, replace=request.replace,
    )
    get_run_logger().info("new style model %r: %s", request.model_name, redact(model, reveal_options(storage_options)))
    return model


def check_inputs(request: TrainStyleRequest, storage_options: dict) -> None:
    """Refuse an unusable photo set with one clear sentence, before any priming or training (the style image is
    checked by train-style's check-style-images, also before any priming)."""
    photos_location = Location(request.photos_url, storage_options)
    try:
        photos = list_files(photos_location, IMAGE_EXTENSIONS)
    except StorageError as error:
        raise ValueError(f"photo set: {error}") from None
    if not photos:
        raise ValueError(f"no images under {photos_location.display}")
