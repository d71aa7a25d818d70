"""Human review: the queue of held and sampled answers, reviewers' verdicts, the reviewer's page."""
