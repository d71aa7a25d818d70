"""The OpenAI-compatible API: protocol models (`schemas`), routes (`router`), serving (`service`)."""
