"""Teacher backends: `local` (in-process transformers), `tgi` and `openai` (remote inference servers).

`echo-benchmark-only` costs nothing and generates nothing: it exists to benchmark the serving path.
"""

from __future__ import annotations

from services.teacher.backends.base import TeacherBackend
from services.teacher.settings import TeacherServerSettings, TeacherSettings


def build_backend(settings: TeacherSettings, *, remote: TeacherServerSettings | None) -> TeacherBackend:
    """The backend `GKT_TEACHER_BACKEND` names; `remote` says how to reach a tgi or openai server."""
    if settings.teacher_backend == "local":
        from services.teacher.backends.local import LocalBackend

        return LocalBackend(
            model=settings.local_model,
            cache_dir=settings.model_cache_dir,
            device=settings.teacher_device,
            dtype=settings.teacher_dtype,
            prefix_cache=settings.teacher_prefix_cache,
            max_rows=settings.teacher_max_batch_size,
        )
    if settings.teacher_backend == "echo-benchmark-only":
        from services.teacher.backends.echo import EchoBackend

        return EchoBackend()
    if remote is None:
        raise ValueError(f"the {settings.teacher_backend} backend needs its TeacherServerSettings")
    if settings.teacher_backend == "tgi":
        from services.teacher.backends.tgi import TgiBackend

        return TgiBackend(settings=remote)
    from services.teacher.backends.openai import OpenAIBackend

    return OpenAIBackend(settings=remote, model=settings.teacher_model)
