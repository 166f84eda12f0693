"""A list-backed torch Dataset, so Trainer tests need no `datasets` package."""

from torch.utils.data import Dataset


class ListDataset(Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]
