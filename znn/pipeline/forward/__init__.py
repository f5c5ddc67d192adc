"""Forward evaluators of one patch: the sequential reference, the phase evaluator, the graph evaluator; conv modes."""
