"""Fine-tuning: the loop (loop), the frozen-prefix inputs (inputs), the recipe for input size and stages trained
(recipe), and the time estimate (estimate)."""
