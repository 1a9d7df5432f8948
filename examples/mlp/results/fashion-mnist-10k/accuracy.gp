# accuracy.gp, written by bkn_mlp: `gnuplot accuracy.gp` in this folder makes accuracy.png
set terminal pngcairo size 1200,1000 font 'sans,10'
set output 'accuracy.png'
set grid lc rgb '#dddddd'
set xlabel 'epoch'
set ylabel 'test accuracy (%)'
set key below horizontal maxcols 4 font ',9'
$D0_0 << EOD
1 77.923 77.923
2 81.817 81.817
3 84.397 84.397
4 85.050 85.050
5 85.397 85.397
EOD
$D0_1 << EOD
1 82.213 81.790
2 83.480 83.387
3 85.023 84.823
4 85.917 85.677
5 86.253 85.950
EOD
$D0_2 << EOD
1 82.220 81.447
2 83.850 83.203
3 84.783 84.590
4 86.007 85.523
5 86.160 85.833
EOD
$D0_3 << EOD
1 79.503 79.503
2 81.757 81.757
3 84.213 84.213
4 85.053 85.053
5 85.420 85.420
EOD
$D0_4 << EOD
1 79.753 79.753
2 82.160 82.160
3 84.437 84.437
4 85.077 85.077
5 85.227 85.227
EOD
$D0_5 << EOD
1 82.347 82.093
2 83.650 83.410
3 85.453 85.257
4 86.123 85.937
5 86.263 86.063
EOD
$D1_0 << EOD
1 77.923 77.923
2 81.817 81.817
3 84.397 84.397
4 85.050 85.050
5 85.397 85.397
EOD
$D1_1 << EOD
1 53.497 30.033
2 55.863 33.427
3 58.427 37.517
4 60.473 38.817
5 60.243 40.033
EOD
$D1_2 << EOD
1 66.587 27.010
2 70.587 27.193
3 71.957 27.497
4 72.407 26.513
5 72.953 27.597
EOD
$D1_3 << EOD
1 79.503 79.503
2 81.757 81.757
3 84.213 84.213
4 85.053 85.053
5 85.420 85.420
EOD
$D1_4 << EOD
1 79.753 79.753
2 82.160 82.160
3 84.437 84.437
4 85.077 85.077
5 85.227 85.227
EOD
$D1_5 << EOD
1 80.747 79.723
2 82.613 82.637
3 84.800 84.757
4 86.060 85.957
5 86.277 86.177
EOD
$D2_0 << EOD
1 80.503 80.503
2 83.690 83.690
3 84.937 84.937
4 85.667 85.667
5 86.200 86.200
EOD
$D2_1 << EOD
1 53.217 32.287
2 56.250 33.687
3 60.350 37.853
4 61.780 41.037
5 62.447 41.317
EOD
$D2_2 << EOD
1 68.180 26.313
2 70.833 27.723
3 72.827 27.573
4 73.473 26.850
5 74.037 26.857
EOD
$D2_3 << EOD
1 80.963 80.963
2 83.333 83.333
3 84.797 84.797
4 85.693 85.693
5 86.023 86.023
EOD
$D2_4 << EOD
1 81.133 81.133
2 83.683 83.683
3 84.790 84.790
4 85.673 85.673
5 86.013 86.013
EOD
$D2_5 << EOD
1 81.010 80.463
2 83.910 83.870
3 85.630 85.487
4 86.410 86.253
5 86.660 86.507
EOD
$D3_0 << EOD
1 80.630 80.630
2 83.123 83.123
3 85.227 85.227
4 85.900 85.900
5 86.170 86.170
EOD
$D3_1 << EOD
1 53.793 31.790
2 59.820 35.493
3 60.187 38.443
4 60.253 38.813
5 60.533 40.100
EOD
$D3_2 << EOD
1 68.473 27.453
2 70.093 26.783
3 72.627 27.757
4 73.107 28.110
5 73.797 28.120
EOD
$D3_3 << EOD
1 81.360 81.360
2 82.927 82.927
3 84.543 84.543
4 85.623 85.623
5 86.007 86.007
EOD
$D3_4 << EOD
1 81.427 81.427
2 83.367 83.367
3 84.743 84.743
4 85.887 85.887
5 86.180 86.180
EOD
$D3_5 << EOD
1 81.623 80.867
2 83.560 83.453
3 85.307 85.100
4 86.290 86.260
5 86.563 86.447
EOD
set xrange [0.5:5.5]
set xtics 1
set multiplot layout 2,2 title "Fashion-MNIST, MLP 784-512-256-10, 5 epochs on the first 10000 training images, seeds 1,2,3\nsolid: moving statistics, dashed: batch statistics (mean over seeds)"
set yrange [75:90]
set title '(gradient batch, statistics batch) = (128, 128)'
plot $D0_0 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#000000' title 'none', \
     $D0_0 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#000000' notitle, \
     $D0_1 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#1f77b4' title 'bn', \
     $D0_1 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#1f77b4' notitle, \
     $D0_2 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#d62728' title 'brn', \
     $D0_2 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#d62728' notitle, \
     $D0_3 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#2ca02c' title 'gn', \
     $D0_3 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#2ca02c' notitle, \
     $D0_4 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#9467bd' title 'ln', \
     $D0_4 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#9467bd' notitle, \
     $D0_5 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#ff7f0e' title 'bkn:weights', \
     $D0_5 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#ff7f0e' notitle
set yrange [25:90]
set title '(gradient batch, statistics batch) = (128, 2)'
plot $D1_0 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#000000' title 'none', \
     $D1_0 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#000000' notitle, \
     $D1_1 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#1f77b4' title 'bn', \
     $D1_1 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#1f77b4' notitle, \
     $D1_2 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#d62728' title 'brn', \
     $D1_2 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#d62728' notitle, \
     $D1_3 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#2ca02c' title 'gn', \
     $D1_3 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#2ca02c' notitle, \
     $D1_4 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#9467bd' title 'ln', \
     $D1_4 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#9467bd' notitle, \
     $D1_5 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#ff7f0e' title 'bkn:weights', \
     $D1_5 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#ff7f0e' notitle
set yrange [25:90]
set title '(gradient batch, statistics batch) = (8, 2)'
plot $D2_0 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#000000' title 'none', \
     $D2_0 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#000000' notitle, \
     $D2_1 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#1f77b4' title 'bn', \
     $D2_1 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#1f77b4' notitle, \
     $D2_2 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#d62728' title 'brn', \
     $D2_2 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#d62728' notitle, \
     $D2_3 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#2ca02c' title 'gn', \
     $D2_3 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#2ca02c' notitle, \
     $D2_4 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#9467bd' title 'ln', \
     $D2_4 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#9467bd' notitle, \
     $D2_5 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#ff7f0e' title 'bkn:weights', \
     $D2_5 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#ff7f0e' notitle
set yrange [25:90]
set title '(gradient batch, statistics batch) = (2, 2)'
plot $D3_0 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#000000' title 'none', \
     $D3_0 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#000000' notitle, \
     $D3_1 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#1f77b4' title 'bn', \
     $D3_1 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#1f77b4' notitle, \
     $D3_2 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#d62728' title 'brn', \
     $D3_2 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#d62728' notitle, \
     $D3_3 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#2ca02c' title 'gn', \
     $D3_3 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#2ca02c' notitle, \
     $D3_4 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#9467bd' title 'ln', \
     $D3_4 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#9467bd' notitle, \
     $D3_5 using 1:2 with linespoints lw 2 pt 7 ps 0.6 lc rgb '#ff7f0e' title 'bkn:weights', \
     $D3_5 using 1:3 with linespoints lw 2 dt 2 pt 6 ps 0.6 lc rgb '#ff7f0e' notitle
unset multiplot
