-- Months whose final invoices are being (or have been) written. Written, under an exclusive
-- advisory lock, before the first final invoice of the month; the rater posts charges under
-- the shared lock and moves a charge for such a month onto the next open month's invoice (its
-- posting's `at`), so a charge rated late is on exactly one invoice and no final invoice ever
-- misses one.
CREATE TABLE billing_month_closing (
    month      date PRIMARY KEY CHECK (extract(day FROM month) = 1),
    started_at timestamptz NOT NULL DEFAULT now()
);

-- Months already closed are closing too.
INSERT INTO billing_month_closing (month, started_at)
SELECT month, closed_at FROM billing_month_closes
ON CONFLICT (month) DO NOTHING;
