"""Gold/proxy/diversity evaluation, reward-model accuracy and reports."""
