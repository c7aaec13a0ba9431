"""Routes that speak other services' HTTP APIs, so their own clients work
against segq unchanged; each is a thin adapter over segq's jobs."""
