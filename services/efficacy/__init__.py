"""The efficacy service (assessments, response, follow-up to week 52)."""
