"""The routing rule: which of each token's top-K experts run under a budget.

Pure torch and numpy (numba for the host twins); no vLLM import. One module per idea, each host twin
beside what it twins:
  alloc_t        Alloc-T: a group's pool redistributed across its tokens by routing score (the oracle)
  carry          the request balance carried across decode steps
  cap            the distinct-expert cap of a pass
  device_budget  one MoE layer's budget routing on the device: K_l lookup, Alloc-T, carry, cap,
                 counters; graph-safe (no host reads, static shapes)
  alloc_t_host   the CPU serving path's twin of device_budget (numba), with
  cap_host       the cap's host twin
  reference      the fp32 MoE-layer oracle the expert kernels are checked against
"""
