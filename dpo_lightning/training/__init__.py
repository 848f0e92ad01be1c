"""Training: the LightningModule, the reference policy, settings, metrics, optimizer, guard, checkpoints, export."""
