"""Student workers: Celery tasks that complete one job each from the teacher's guidance."""
