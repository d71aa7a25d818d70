"""The eval suite: what tunegate knows about the quality of what it serves, and what it does about it.

One module per job, each a set of functions over a SQLAlchemy session (they flush, the caller commits):

* `testsets`   reviewed answers split into the frozen holdout, the versioned test set and training labels
* `scoring`    online scores of sampled live exchanges per adapter version and time window
* `drift`      live windows against a reference: risk and flag rate (KS / Wasserstein / PSI, Fisher) and
               inputs (a MiniLM domain classifier's ROC AUC)
* `prioritise` the review queue filled by priority within a daily budget
* `agreement`  guard and reviewers agreeing, and the guard's re-fit (gated too)
* `triggers`   when a route retrains, and the content-hashed snapshot it trains on
* `gate`       a candidate against the active version through vLLM: paired test, holdout, power
* `canary`     traffic steps with automatic rollback or promotion
* `stats`      the paired tests, intervals and sample sizes the gate and the canary use
* `export`     a test set as an lm-evaluation-harness task
* `report`     the loop's HTML report with plots
* `metrics`    the worker's Prometheus gauges

The wiring that runs them in order for every route (a worker's pass) is `tunegate.loop`.
May import `guardrails` and `core`; never `gateway` or `training`.
"""
