"""What a peer's updates reveal about its data, and the options that limit it (issue 25).

* :mod:`swarmlm.privacy.config`: ``PrivacyConfig``, the ``privacy`` section of a run config
  (torch-free);
* :mod:`swarmlm.privacy.accountant`: budgets (Opacus's RDP/PRV accountants): planning a
  run, refusing an impossible target, the per-peer ledger;
* :mod:`swarmlm.privacy.dp`: DP-SGD (Poisson-sampled records, per-sample clipping with
  ``torch.func``, Gaussian noise) and noised round contributions;
* :mod:`swarmlm.privacy.secagg`: secure aggregation (pairwise masks, Shamir shares).

Nothing is imported here, so importing the package costs nothing; see docs/privacy.md.
"""
