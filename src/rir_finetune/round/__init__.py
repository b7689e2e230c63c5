"""The Reinforced-IR round: every stage (generate -> augment -> mine -> score -> train -> eval) as one resumable
command. It sits above training, prep and evaluation and drives their commands; nothing below imports it."""
