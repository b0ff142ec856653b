#!/usr/bin/perl
# Deterministic small-file tree for the metadata benchmark (bench/run.sh).
# usage: mktree.pl ROOT DIRS FILES_PER_DIR
# Creates ROOT/tree/aNN/bNN/ directories (DIRS in total, 20 per level-1 directory),
# each with FILES_PER_DIR files of 1-8 KiB. Same arguments, same bytes, every time.
use strict;
use warnings;

my ($root, $dirs, $files) = @ARGV;
die "usage: $0 ROOT DIRS FILES_PER_DIR\n" unless defined $files;

srand(20251125);
# One random pool; each file is a slice of it at a random offset.
my $pool = join('', map { chr(32 + int(rand(95))) } 1 .. 65536);
$pool .= "\n";

mkdir "$root/tree" or die "mkdir $root/tree: $!\n";
for my $d (0 .. $dirs - 1) {
    my $l1 = sprintf('%s/tree/a%02d', $root, int($d / 20));
    my $l2 = sprintf('%s/b%02d', $l1, $d % 20);
    -d $l1 or mkdir $l1 or die "mkdir $l1: $!\n";
    mkdir $l2 or die "mkdir $l2: $!\n";
    for my $f (0 .. $files - 1) {
        my $size = 1024 + int(rand(7 * 1024 + 1));
        my $off  = int(rand(length($pool) - $size));
        my $path = sprintf('%s/f%02d.txt', $l2, $f);
        open(my $fh, '>', $path) or die "open $path: $!\n";
        print $fh substr($pool, $off, $size);
        close($fh) or die "close $path: $!\n";
    }
}
