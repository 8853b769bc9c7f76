"""The few-shot core: heads on features (`heads`), the MTL FC base-learner (`fc`) and the one
evaluation loop over seeded episodes (`evaluate`). numpy only; every caller uses these."""
