"""Student backends: `local` (the model in this process), `openai` and `tgi` (an inference server)."""

from __future__ import annotations

from services.student.backends.base import StudentBackend
from services.student.settings import StudentServerSettings, StudentSettings


def build_backend(settings: StudentSettings, *, remote: StudentServerSettings | None) -> StudentBackend:
    """The backend `GKT_STUDENT_BACKEND` names (`remote`: how to reach an openai or tgi server), started,
    and checked against GKT_STUDENT_MAX_NEW_TOKENS: one that cannot generate that many tokens raises
    ValueError naming the values."""
    if settings.student_backend == "local":
        from services.student.backends.local import LocalStudentBackend

        local = LocalStudentBackend.load(settings)
        try:
            local.check_limits(max_new_tokens=settings.student_max_new_tokens)
        except ValueError:
            local.stop()
            raise
        return local
    from services.student.backends.remote import RemoteStudentBackend, ServerClient

    if remote is None:
        raise ValueError(f"the {settings.student_backend} backend needs its StudentServerSettings")
    client: ServerClient
    if settings.student_backend == "tgi":
        from services.student.backends.tgi import TgiClient

        client = TgiClient(settings=remote, connections=settings.student_max_batch)
    else:
        from services.student.backends.openai import OpenAIClient

        client = OpenAIClient(
            settings=remote, model=settings.student_model, connections=settings.student_max_batch
        )
    backend = RemoteStudentBackend(client)
    backend.start(max_new_tokens=settings.student_max_new_tokens, max_batch=settings.student_max_batch)
    return backend
